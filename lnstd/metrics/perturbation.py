"""Perturbation tests: the pieces every one of them shares (pixel ranks, step images, forwards of
many step images at once) and ``lnstd eval``'s positive/negative perturbation curves (accuracy as
0%, 10%, ..., 90% of the pixels go; docs/methods.md, Evaluation). Deletion and insertion (Petsiuk et
al. 2018) are :func:`lnstd.metrics.faithfulness.faithfulness`'s, for ``lnstd eval`` as for the
job's columns: one implementation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..ops import upsample

__all__ = [
    "FRACTIONS",
    "PERTURBATION_METRICS",
    "auc",
    "perturbation_curves",
    "perturbed",
    "pixel_ranks",
    "target_scores",
]

FRACTIONS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 .. 0.9

# Figures of the curves (directions and descriptions: metrics/registry.py), by curve name.
PERTURBATION_METRICS = {"positive_auc": "positive", "negative_auc": "negative"}

# A step image: (kind, k). ``remove_top``: the k most relevant pixels replaced by the baseline;
# ``remove_bottom``: the k least relevant; ``keep_top``: only the k most relevant shown.
Step = tuple[str, int]


def auc(curve: torch.Tensor, fractions: Sequence[float] = FRACTIONS) -> torch.Tensor:
    """Trapezoid area under (B, F) curves over the fractions."""
    x = torch.tensor(fractions, dtype=curve.dtype, device=curve.device)
    return torch.trapezoid(curve, x=x, dim=-1)


def pixel_ranks(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W) float32 ranks of the pixels of (B, h, w) maps upsampled bilinearly to ``size``:
    0 for the most relevant; tied pixels all get their group's average rank (not their position)."""
    rel = upsample(heat, size).flatten(1)
    b, n = rel.shape
    values, order = rel.sort(dim=1, descending=True, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = (new.long().cumsum(1) - 1 + n * torch.arange(b, device=rel.device)[:, None]).flatten()
    pos = torch.arange(n, dtype=torch.float32, device=rel.device).repeat(b)
    first = torch.full((b * n,), float(n), device=rel.device).scatter_reduce(0, group, pos, "amin")
    last = torch.zeros(b * n, device=rel.device).scatter_reduce(0, group, pos, "amax")
    mean = ((first + last) / 2)[group].view(b, n)
    return torch.empty_like(mean).scatter_(1, order, mean)


def perturbed(images: torch.Tensor, ranks: torch.Tensor, step: Step, baseline: torch.Tensor) -> torch.Tensor:
    """The step image of every image of (B, C, H, W) ``images`` (``ranks`` from :func:`pixel_ranks`,
    ``baseline`` broadcastable to the images). A pixel counts among the top k when its rank < k."""
    kind, k = step
    b, _, h, w = images.shape
    n = h * w
    top = ranks < k if kind != "remove_bottom" else ranks > n - 1 - k
    top = top.view(b, 1, h, w)
    if kind == "keep_top":
        return torch.where(top, images, baseline)
    return torch.where(top, baseline, images)


def target_scores(
    model: nn.Module,
    count: int,
    make: Callable[[range], torch.Tensor],
    targets: torch.Tensor,
    chunk: int = 64,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probability of the target and whether it is the argmax, for ``count`` step images of
    each of the B images: ``make(range)`` returns those steps' images, step-major ((S*B, C, H, W)).
    One forward per ``chunk`` step images (at least one step of the whole batch), under autocast
    to ``dtype`` when given (the model's precision).

    Returns:
        (probabilities, hits), each (count, B) float32.
    """
    b = targets.shape[0]
    per = max(1, chunk // max(b, 1))
    probs, hits = [], []
    for s0 in range(0, count, per):
        steps = range(s0, min(count, s0 + per))
        batch = make(steps)
        cast = torch.autocast(batch.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), cast:
            logits = model(batch).float()
        t = targets.repeat(len(steps))[:, None]
        probs.append(logits.softmax(dim=1).gather(1, t).view(len(steps), b))
        hits.append((logits.argmax(1, keepdim=True) == t).float().view(len(steps), b))
    return torch.cat(probs), torch.cat(hits)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    heat: torch.Tensor,
    targets: torch.Tensor,
    fractions: Sequence[float] = FRACTIONS,
    baseline: float | torch.Tensor = 0.0,
    chunk: int = 64,
    kinds: Sequence[str] = ("positive", "negative"),
) -> dict[str, torch.Tensor]:
    """Accuracy curves of (B, F) for one batch, F = len(fractions), of the ``kinds`` asked for.

    Pixels are ranked by the heatmap upsampled to the image (:func:`pixel_ranks`: ties share their
    average rank). For a fraction f (k = round(f * pixels)): ``positive`` / ``negative`` replace
    the top / bottom k pixels by ``baseline`` (0 = the dataset mean in normalised space) and record
    whether the target is still the model's argmax.

    Returns:
        dict with ``positive`` and / or ``negative``, each (B, F) float32.
    """
    h, w = images.shape[-2:]
    ranks = pixel_ranks(heat.to(images.device), (h, w))
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    ks = [round(f * h * w) for f in fractions]
    removes = {"positive": "remove_top", "negative": "remove_bottom"}
    steps = [(removes[kind], k) for kind in kinds for k in ks]
    _, hits = target_scores(
        model, len(steps), lambda r: torch.cat([perturbed(images, ranks, steps[s], base) for s in r]),
        targets, chunk,
    )  # fmt: skip
    f = len(ks)
    return {kind: hits[j * f : (j + 1) * f].T for j, kind in enumerate(kinds)}
