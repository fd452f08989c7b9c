"""The one registry of metrics: name, where it lives, which way is better, what it means.

Evaluation (``lnstd eval``), the job's per-row columns, ``lnstd aggregate`` and the report all read
their metric facts from here, so a metric has one name, one direction and one description.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FAITHFULNESS",
    "FAITHFULNESS_COLUMNS",
    "FAITHFULNESS_CURVES",
    "FAITHFULNESS_METRICS",
    "MASK_METRICS",
    "METRICS",
    "Metric",
    "column_metrics",
    "eval_metrics",
    "higher_is_better",
]

# Per-image columns against a mask (lnstd.metrics.mask computes them).
MASK_METRICS = ("foreground_iou", "pointing_game", "mass_in_mask")
# Faithfulness tests of ``lnstd run --faithfulness`` and their per-image columns
# (lnstd.metrics.faithfulness computes them).
FAITHFULNESS = ("deletion", "insertion", "road")
FAITHFULNESS_COLUMNS = {
    "deletion": ("deletion_auc",),
    "insertion": ("insertion_auc",),
    "road": ("road_morf", "road_lerf", "road_gap"),
}
FAITHFULNESS_METRICS = tuple(c for cols in FAITHFULNESS_COLUMNS.values() for c in cols)
# ... and the curves behind those figures, one list column each: deletion and insertion at x = j/steps,
# ROAD's MoRF and LeRF at its percentiles (the report draws them for the gallery's images).
FAITHFULNESS_CURVES = ("deletion_curve", "insertion_curve", "road_morf_curve", "road_lerf_curve")


@dataclass(frozen=True)
class Metric:
    """One figure.

    Attributes:
        name: its name everywhere (column, table, JSON key).
        higher_is_better: the direction.
        level: ``"image"`` (one value per image: a Parquet column of ``lnstd run`` and a per-image
            figure of ``lnstd eval``), or ``"dataset"`` (only a total over a dataset: ``lnstd eval``).
        column: True when ``lnstd run`` writes it per row.
        description: one line for tables and the docs.
    """

    name: str
    higher_is_better: bool
    level: str
    column: bool
    description: str


_ALL = (
    Metric("probability", True, "image", True, "softmax probability of the explained class"),
    Metric("correct", True, "image", True, "the prediction equals the label (1) or not (0)"),
    Metric("pixel_accuracy", True, "dataset", False,
           "ImageNet-segmentation protocol: correctly labelled pixels over all labelled pixels"),
    Metric("miou", True, "dataset", False,
           "ImageNet-segmentation protocol: mean over background and foreground of the dataset-summed IoU"),
    Metric("map", True, "dataset", False,
           "ImageNet-segmentation protocol: mean over images of the average precision of [1-heat, heat]"),
    Metric("foreground_iou", True, "image", True,
           "IoU of the heatmap's foreground (heat > its mean) with the object mask, per image"),
    Metric("pointing_game", True, "image", True, "1 if the hottest pixel lies inside the mask"),
    Metric("mass_in_mask", True, "image", True, "share of the heatmap's total relevance inside the mask"),
    Metric("positive_auc", False, "image", False, "accuracy under removing the most relevant pixels first"),
    Metric("negative_auc", True, "image", False, "accuracy under removing the least relevant pixels first"),
    Metric("deletion_auc", False, "image", True,
           "area under the target probability as the most relevant pixels go (--faithfulness)"),
    Metric("insertion_auc", True, "image", True,
           "area under the target probability as the most relevant pixels come in (--faithfulness)"),
    Metric("road_morf", False, "image", True,
           "ROAD: target probability with the most relevant pixels imputed, mean over 10-90%"),
    Metric("road_lerf", True, "image", True,
           "ROAD: target probability with the least relevant pixels imputed, mean over 10-90%"),
    Metric("road_gap", True, "image", True, "ROAD: road_lerf - road_morf (the map's faithfulness)"),
    Metric("elapsed_ms", False, "image", True, "attribution time per image in its batch (ms)"),
    Metric("completeness", True, "image", True,
           "LRP methods: share of the explained relevance the map accounts for (docs/lrp.md; 1 = all)"),
)  # fmt: skip

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


def higher_is_better(name: str) -> bool:
    """The direction of metric ``name``."""
    return METRICS[name].higher_is_better


def column_metrics() -> list[str]:
    """Per-row numeric columns of ``lnstd run``, in table order."""
    return [m.name for m in _ALL if m.column]


def eval_metrics() -> list[str]:
    """Figures of ``lnstd eval``, in table order."""
    skip = ("probability", "correct", "elapsed_ms", "foreground_iou", "completeness",
            "road_morf", "road_lerf", "road_gap")  # fmt: skip
    return [m.name for m in _ALL if m.name not in skip]
