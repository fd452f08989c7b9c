"""The evidence check of the planted-evidence benchmark: does the model use the marker?

Accuracy on the clean images, with the marker's box masked (filled with the normalised mean, 0:
mid-grey), and with everything but the marker's box masked. A model that reads the marker falls
to chance in the first case and keeps its accuracy in the second. On the shortcut variant also:
accuracy on the watermark's class with and without the watermark (the same images otherwise),
and how often the other classes' images are called that class with and without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data.planted import PLANTED_CLASSES, SHORTCUT_CLASS, planted_batch
from .train import TEST_SEED, toy_tensors

__all__ = ["evidence_check", "evidence_holds", "masked_accuracies", "predict"]

CHANCE_MARGIN = 0.10  # marker masked: accuracy within this of chance
KEPT_SHARE = 0.80  # only the marker kept: at least this share of the clean accuracy
MIN_CLEAN = 0.75  # and the model must have learnt the task: a model at chance proves nothing


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Predicted classes (N,) of normalised images (N, 3, H, W), batched on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[k : k + batch].to(device)).argmax(1) for k in range(0, len(images), batch)]
    return torch.cat(out)


def masked_accuracies(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    fill: float = 0.0,
    batch: int = 250,
) -> dict[str, float]:
    """Accuracy on normalised ``images`` (N, 3, H, W): ``clean``; ``marker_masked`` (pixels in
    ``masks`` (N, H, W) set to ``fill``); ``only_marker`` (pixels outside set to ``fill``)."""
    labels = labels.to(next(model.parameters()).device)
    keep = masks[:, None].to(images.device)
    variants = {
        "clean": images,
        "marker_masked": torch.where(keep, fill, images),
        "only_marker": torch.where(keep, images, fill),
    }
    return {k: _share(predict(model, x, batch) == labels) for k, x in variants.items()}


def _share(hits: torch.Tensor) -> float:
    return round(float(hits.float().mean()), 4)


def _shortcut_figures(model: nn.Module, n: int, seed: int) -> dict[str, Any]:
    """The watermark's pull: the same split drawn with the watermark on every image and on none."""
    preds, labels = {}, None
    for mode in ("on", "off"):
        b = planted_batch(n, seed, shortcut=True, watermark=mode)
        preds[mode] = predict(model, toy_tensors(b.images)).cpu()
        labels = torch.from_numpy(b.labels[:, 0])
    own, other = labels == SHORTCUT_CLASS, labels != SHORTCUT_CLASS
    return {
        "shortcut_class": PLANTED_CLASSES[SHORTCUT_CLASS],
        "shortcut_class_n": int(own.sum()),
        "shortcut_class_accuracy_with_watermark": _share(preds["on"][own] == SHORTCUT_CLASS),
        "shortcut_class_accuracy_without_watermark": _share(preds["off"][own] == SHORTCUT_CLASS),
        "other_classes_called_shortcut_with_watermark": _share(preds["on"][other] == SHORTCUT_CLASS),
        "other_classes_called_shortcut_without_watermark": _share(preds["off"][other] == SHORTCUT_CLASS),
    }


def evidence_check(
    model: nn.Module, dataset: str = "planted", n: int = 1000, seed: int = TEST_SEED
) -> dict[str, Any]:
    """The masking record of a model trained on ``dataset`` (``planted`` or ``planted-shortcut``),
    on the split ``seed`` (the test split by default): the figures of ``masked_accuracies``, the
    chance level, whether the check holds, and on the shortcut variant its watermark figures."""
    b = planted_batch(n, seed, shortcut=dataset == "planted-shortcut")
    labels = torch.from_numpy(b.labels[:, 0])
    record: dict[str, Any] = {"n": n, "seed": seed, "fill": "0 (normalised mean: mid-grey)"}
    record.update(masked_accuracies(model, toy_tensors(b.images), torch.from_numpy(b.masks[:, 0]), labels))
    record["chance"] = 1 / len(PLANTED_CLASSES)
    record["holds"] = evidence_holds(record)
    if dataset == "planted-shortcut":
        record.update(_shortcut_figures(model, n, seed))
    return record


def evidence_holds(record: dict[str, Any]) -> bool:
    """The benchmark's criterion: clean accuracy at least 75%, marker masked within 10 points of
    chance, only the marker kept at least 80% of the clean accuracy."""
    near_chance = abs(record["marker_masked"] - record["chance"]) <= CHANCE_MARGIN
    kept = record["only_marker"] >= KEPT_SHARE * record["clean"]
    return bool(record["clean"] >= MIN_CLEAN and near_chance and kept)
