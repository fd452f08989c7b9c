"""Perturbation tests: positive/negative perturbation and deletion/insertion, one batched forward
per step (docs/methods.md, Evaluation; Petsiuk et al. 2018 for deletion/insertion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops import upsample

__all__ = ["FRACTIONS", "PERTURBATION_METRICS", "auc", "perturbation_curves"]

FRACTIONS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 .. 0.9

# Figures of the curves (directions and descriptions: metrics/registry.py), by curve name.
PERTURBATION_METRICS = {
    "positive_auc": "positive",
    "negative_auc": "negative",
    "deletion_auc": "deletion",
    "insertion_auc": "insertion",
}


def auc(curve: torch.Tensor, fractions: Sequence[float] = FRACTIONS) -> torch.Tensor:
    """Trapezoid area under (B, F) curves over the fractions."""
    x = torch.tensor(fractions, dtype=curve.dtype, device=curve.device)
    return torch.trapezoid(curve, x=x, dim=-1)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    heat: torch.Tensor,
    targets: torch.Tensor,
    fractions: Sequence[float] = FRACTIONS,
    baseline: float | torch.Tensor = 0.0,
) -> dict[str, torch.Tensor]:
    """Curves of (B, F) for one batch, F = len(fractions), each step one forward of the batch.

    Pixels are ranked by the heatmap upsampled to the image (ties by position). For a fraction f:
    ``positive`` / ``negative`` replace the top / bottom f of pixels by ``baseline`` (0 = the
    dataset mean in normalised space) and record accuracy (target == argmax); ``deletion``
    replaces the top f and ``insertion`` keeps only the top f (rest = baseline), recording the
    target's softmax probability.

    Returns:
        dict with ``positive``, ``negative`` (accuracy curves) and ``deletion``, ``insertion``
        (probability curves), each (B, F) float32.
    """
    b, _, h, w = images.shape
    rel = upsample(heat.to(images.device), (h, w)).reshape(b, -1)
    # rank[i, p] = 0 for the most relevant pixel of image i
    order = rel.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=images.device).expand(b, -1))
    n = h * w
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    curves: dict[str, list[torch.Tensor]] = {k: [] for k in ("positive", "negative", "deletion", "insertion")}
    for f in fractions:
        k = round(f * n)
        top = (rank < k).reshape(b, 1, h, w)
        bottom = (rank >= n - k).reshape(b, 1, h, w)
        batch = torch.cat(
            [
                torch.where(top, base, images),  # positive == deletion's image
                torch.where(bottom, base, images),
                torch.where(top, images, base),  # insertion: only the top f shown
            ]
        )
        logits = model(batch).float()
        probs = logits.softmax(dim=1).gather(1, targets.repeat(3)[:, None]).squeeze(1)
        hit = (logits.argmax(1) == targets.repeat(3)).float()
        curves["positive"].append(hit[:b])
        curves["deletion"].append(probs[:b])
        curves["negative"].append(hit[b : 2 * b])
        curves["insertion"].append(probs[2 * b :])
    return {k: torch.stack(v, dim=1) for k, v in curves.items()}
