"""Evaluation of explanations: the ImageNet-segmentation protocol, perturbation tests, baselines,
the model-randomisation sanity check (Adebayo et al. 2018), the ablation of docs/methods.md and the
two-object class-sensitivity check. Everything runs batched on the model's device."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .explainer import Explainer
from .metrics.faithfulness import faithfulness
from .metrics.mask import mask_metrics
from .metrics.perturbation import FRACTIONS, PERTURBATION_METRICS, auc, perturbation_curves
from .metrics.rank import spearman
from .metrics.registry import eval_metrics, higher_is_better
from .metrics.segmentation import SegmentationMeter

__all__ = [
    "HIGHER_IS_BETTER",
    "Batch",
    "bootstrap",
    "class_sensitivity",
    "evaluate",
    "gaussian_heatmap",
    "paired_difference",
    "randomized_copy",
    "write_results",
]

# The figures of the results table, in order, with their directions (from the one registry).
HIGHER_IS_BETTER = {name: higher_is_better(name) for name in eval_metrics()}
PETSIUK = ("deletion", "insertion")  # eval's deletion / insertion: the job's faithfulness figures
EVAL_PERTURBATION = (*PERTURBATION_METRICS, *(f"{m}_auc" for m in PETSIUK))


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) normalised
    masks: torch.Tensor  # (B, H, W) bool
    labels: torch.Tensor | None = None  # (B,)


def gaussian_heatmap(batch: int, grid: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """A centred Gaussian on the token grid: the 'objects are in the middle' baseline."""
    h, w = grid
    ys = (torch.arange(h) + 0.5) / h - 0.5
    xs = (torch.arange(w) + 0.5) / w - 0.5
    g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return g.expand(batch, h, w).clone()


def randomized_copy(model: nn.Module, seed: int = 1) -> nn.Module:
    """The same architecture with every weight re-initialised (cascading randomisation, all layers)."""
    import copy

    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in clone.modules():
        if m is not clone and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(clone, "init_weights"):
        clone.init_weights()
    return clone.eval()


class _Collector:
    """Per-image figures of one heatmap source, kept for dataset totals and bootstrap intervals."""

    def __init__(self) -> None:
        self.meter = SegmentationMeter()
        self.rows: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.rows.setdefault(name, []).append(values.detach().double().cpu().numpy())

    def update(self, heat: torch.Tensor, masks: torch.Tensor) -> None:
        per = self.meter.update(heat, masks)
        self.add("correct", per["correct"])
        self.add("labelled", torch.full((masks.shape[0],), float(masks[0].numel())))
        self.add("inter_bg", per["intersection"][:, 0])
        self.add("union_bg", per["union"][:, 0])
        self.add("inter_fg", per["intersection"][:, 1])
        self.add("union_fg", per["union"][:, 1])
        self.add("ap", per["ap"])
        mm = mask_metrics(heat, masks)
        self.add("pointing_game", mm["pointing_game"])
        self.add("mass_in_mask", mm["mass_in_mask"])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.rows.items()}


def _figures(a: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, float]:
    rows = slice(None) if idx is None else idx

    def s(k: str) -> float:
        return a[k][rows].sum()

    def m(k: str) -> float:
        return a[k][rows].mean()

    out = {
        "pixel_accuracy": s("correct") / s("labelled"),
        "miou": 0.5 * (s("inter_bg") / max(s("union_bg"), 1) + s("inter_fg") / max(s("union_fg"), 1)),
        "map": m("ap"),
        "pointing_game": m("pointing_game"),
        "mass_in_mask": m("mass_in_mask"),
    }
    for k in EVAL_PERTURBATION:
        if k in a:
            out[k] = m(k)
    return {k: float(v) for k, v in out.items()}


def _interval(draws: list[dict[str, float]], key: str) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of ``key`` over bootstrap draws."""
    values = [d[key] for d in draws]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def bootstrap(a: dict[str, np.ndarray], n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals, resampling images (dataset totals are recomputed per resample)."""
    rng = np.random.default_rng(seed)
    size = len(next(iter(a.values())))
    draws = [_figures(a, rng.integers(0, size, size)) for _ in range(n)]
    return {k: _interval(draws, k) for k in draws[0]}


def paired_difference(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Figures of ``a`` minus those of ``b`` on the same images, with a 95% interval from resampling
    the images jointly (so the images both are scored on do not count as noise)."""
    rng = np.random.default_rng(seed)
    size = len(next(iter(a.values())))
    fa, fb = _figures(a), _figures(b)
    point = {k: fa[k] - fb[k] for k in fa if k in fb}
    draws = []
    for _ in range(n):
        idx = rng.integers(0, size, size)
        fa, fb = _figures(a, idx), _figures(b, idx)
        draws.append({k: fa[k] - fb[k] for k in point})
    return {k: (float(point[k]), *_interval(draws, k)) for k in point}


def evaluate(
    model: nn.Module,
    batches: Callable[[], Iterator[Batch]],
    methods: list[str],
    perturbation: bool = True,
    baselines: bool = True,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Every method (and the Gaussian / randomised-model baselines) on every batch.

    Returns ``{"methods": {name: {metric: value}}, "intervals": {...}, "sanity_rank_correlation":
    {...}, "paired": {"lnstd - gae": {metric: (difference, low, high)}}, "n": N}`` (``paired`` when
    both methods ran).
    """
    explainer = Explainer(model, methods, **options)
    random_model = randomized_copy(model) if baselines else None
    random_explainer = Explainer(random_model, methods, **options) if random_model is not None else None
    collect = {m: _Collector() for m in methods}
    if baselines:
        collect["gaussian (baseline)"] = _Collector()
        for m in methods:
            collect[f"{m} (randomised model)"] = _Collector()
    sanity: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    n = 0
    for batch in batches():
        x, masks = batch.images, batch.masks
        out = explainer(x)
        for m in methods:
            heat = out.heatmaps[m]
            collect[m].update(heat, masks)
            if perturbation:
                # the job's own figures (``lnstd run --faithfulness``), on the same defaults; positive's
                # step images are deletion's first ones, so its curve is their argmax hits, not new forwards
                figures = faithfulness(model, x, heat, out.targets, PETSIUK, hits=True)
                curves = perturbation_curves(model, x, heat, out.targets, kinds=("negative",))
                curves["positive"] = figures.pop("deletion_hits")[:, : len(FRACTIONS)]
                del figures["insertion_hits"]
                for key, curve in PERTURBATION_METRICS.items():
                    collect[m].add(key, auc(curves[curve]))
                for key, value in figures.items():
                    collect[m].add(key, value)
        if random_explainer is not None:
            grid = tuple(out.heatmaps[methods[0]].shape[1:])
            collect["gaussian (baseline)"].update(gaussian_heatmap(x.shape[0], grid).to(x.device), masks)
            rout = random_explainer(x, out.targets)
            for m in methods:
                collect[f"{m} (randomised model)"].update(rout.heatmaps[m], masks)
                sanity[m].append(spearman(out.heatmaps[m], rout.heatmaps[m]).cpu().numpy())
        n += x.shape[0]
        if progress:
            progress(x.shape[0])
    results: dict[str, Any] = {"n": n, "methods": {}, "intervals": {}, "sanity_rank_correlation": {}}
    arrays = {name: c.arrays() for name, c in collect.items()}
    for name, a in arrays.items():
        results["methods"][name] = _figures(a)
        results["intervals"][name] = bootstrap(a)
    if "lnstd" in arrays and "gae" in arrays:
        results["paired"] = {"lnstd - gae": paired_difference(arrays["lnstd"], arrays["gae"])}
    for m, vals in sanity.items():
        if vals:
            results["sanity_rank_correlation"][m] = float(np.concatenate(vals).mean())
    return results


@torch.no_grad()
def _mass(heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask_metrics(heat, mask)["mass_in_mask"]


def class_sensitivity(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                      methods: list[str], **options: Any) -> dict[str, float]:  # fmt: skip
    """Two objects per image (classes a, b): explaining a should put more relevance in a's mask
    than in b's. Returns, per method, the fraction of (image, explained class) pairs where it does."""
    ex = Explainer(model, methods, **options)
    wins = {m: [] for m in methods}
    for k in range(2):
        out = ex(images, labels[:, k])
        for m in methods:
            own = _mass(out.heatmaps[m], masks[:, k])
            other = _mass(out.heatmaps[m], masks[:, 1 - k])
            wins[m].append((own > other).float())
    return {m: float(torch.cat(v).mean()) for m, v in wins.items()}


def ablation(
    model: nn.Module, batches: Callable[[], Iterator[Batch]], blocks: list[Any]
) -> list[dict[str, Any]]:
    """mIoU / mAP of ``lnstd`` for every std x normalize x blocks combination (docs/methods.md)."""
    rows = []
    for std, norm, blk in itertools.product(
        ("inverse", "multiply", "none"), ("matrix", "row", "none"), blocks
    ):
        ex = Explainer(model, ["lnstd"], std=std, normalize=norm, blocks=blk)
        meter = SegmentationMeter()
        for batch in batches():
            meter.update(ex(batch.images).heatmaps["lnstd"], batch.masks)
        rows.append({"std": std, "normalize": norm, "blocks": blk, **meter.compute()})
    return rows


def write_results(results: dict[str, Any], out_dir: str, title: str) -> tuple[str, str]:
    """results.json and results.md (the Markdown tables the README quotes)."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "results.json")
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"### {title}", "", f"{results['n']} images; 95% bootstrap intervals in brackets.", ""]
    metrics = [k for k in HIGHER_IS_BETTER if any(k in v for v in results["methods"].values())]
    lines.append(
        "| method | " + " | ".join(f"{k} {'↑' if HIGHER_IS_BETTER[k] else '↓'}" for k in metrics) + " |"
    )
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, vals in results["methods"].items():
        cells = []
        for k in metrics:
            if k in vals:
                lo, hi = results["intervals"][name][k]
                cells.append(f"{vals[k]:.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    one_row_tables = {
        "sanity_rank_correlation": "Model-randomisation sanity check (Spearman rank correlation, trained vs re-initialised; lower = more model-dependent):",
        "class_sensitivity": "Two-object class sensitivity (fraction of explanations with more relevance on the explained object):",
    }
    for key, caption in one_row_tables.items():
        if results.get(key):
            row = results[key]
            lines += ["", caption, "", "| " + " | ".join(row) + " |", "|---" * len(row) + "|"]
            lines.append("| " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    for pair, diffs in results.get("paired", {}).items():
        lines += [
            "",
            f"Paired difference `{pair}` on the same images (95% interval; 0 inside = no evidence of a difference):",
            "",
        ]
        lines += ["| " + " | ".join(diffs) + " |", "|---" * len(diffs) + "|"]
        lines.append(
            "| " + " | ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in diffs.values()) + " |"
        )
    if results.get("ablation"):
        lines += [
            "",
            "Ablation of `lnstd` (std x normalize x blocks):",
            "",
            "| std | normalize | blocks | mIoU | mAP |",
            "|---|---|---|---|---|",
        ]
        for r in results["ablation"]:
            lines.append(
                f"| {r['std']} | {r['normalize']} | {r['blocks']} | {r['miou']:.3f} | {r['map']:.3f} |"
            )
    mpath = os.path.join(out_dir, "results.md")
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath
