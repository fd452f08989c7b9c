"""The ImageNet-segmentation protocol (Chefer et al. 2021a), batched on tensors (docs/methods.md).

Heatmaps are upsampled bilinearly to the mask, min-max scaled to [0, 1]; foreground = heat > mean.
Pixel accuracy and mIoU accumulate counts over the whole dataset; AP is per image, then averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import minmax, upsample

__all__ = ["SegmentationMeter", "average_precision", "scaled"]


def scaled(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) token maps -> (B, H, W) in [0, 1] at the mask's size."""
    return minmax(upsample(heat, size))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row average precision, as scikit-learn's ``average_precision_score`` defines it.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, ties grouped.

    Args:
        scores: (B, n) float scores.
        labels: (B, n) bool/0-1 ground truth.

    Returns:
        (B,) float64; rows with no positive get 0.
    """
    s, order = scores.double().sort(dim=1, descending=True, stable=True)
    y = labels.gather(1, order).double()
    tp = y.cumsum(dim=1)
    rank = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=torch.float64)
    ends = torch.ones_like(s, dtype=torch.bool)
    ends[:, :-1] = s[:, 1:] != s[:, :-1]  # last position of each group of tied scores
    tp_end = torch.where(ends, tp, torch.zeros_like(tp))
    prev = torch.cummax(tp_end, dim=1).values
    prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], dim=1)  # tp at the previous end
    gain = torch.where(ends, tp - prev, torch.zeros_like(tp))
    total = tp[:, -1]
    ap = (gain * tp / rank).sum(dim=1) / total.clamp(min=1)
    return torch.where(total > 0, ap, torch.zeros_like(ap))


@dataclass
class SegmentationMeter:
    """Accumulates pixel accuracy, mIoU (background + foreground) and mAP over batches.

    Directions and descriptions of its figures: :mod:`lnstd.metrics.registry`.
    """

    correct: float = 0.0
    labelled: float = 0.0
    intersection: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    union: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    ap: list[torch.Tensor] = field(default_factory=list)

    def update(self, heat: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add a batch: (B, h, w) heatmaps, (B, H, W) boolean masks.

        Returns per-image figures and the counts behind them (``correct`` pixels, and per class
        ``intersection`` / ``union``), from which dataset totals of any subset can be rebuilt.
        """
        h = scaled(heat, tuple(mask.shape[-2:]))
        m = mask.bool()
        pred = h > h.mean(dim=(1, 2), keepdim=True)
        correct = (pred == m).sum(dim=(1, 2)).double()
        inter = torch.stack([(~pred & ~m).sum(dim=(1, 2)), (pred & m).sum(dim=(1, 2))], 1).double()
        union = torch.stack([(~pred | ~m).sum(dim=(1, 2)), (pred | m).sum(dim=(1, 2))], 1).double()
        flat_h, flat_m = h.flatten(1), m.flatten(1)
        ap = average_precision(torch.cat([1 - flat_h, flat_h], 1), torch.cat([~flat_m, flat_m], 1))
        self.correct += float(correct.sum())
        self.labelled += float(m[0].numel() * m.shape[0])
        self.intersection += inter.sum(0).cpu()
        self.union += union.sum(0).cpu()
        self.ap.append(ap.cpu())
        n = float(m[0].numel())
        return {
            "pixel_accuracy": correct / n,
            "iou": (inter / union.clamp(min=1)).mean(1),
            "ap": ap,
            "correct": correct,
            "intersection": inter,  # (B, 2): background, foreground
            "union": union,
        }

    def compute(self) -> dict[str, float]:
        """Dataset-level pixel accuracy and mIoU, and the mean of per-image AP."""
        iou = self.intersection / self.union.clamp(min=1)
        return {
            "pixel_accuracy": self.correct / max(self.labelled, 1.0),
            "miou": float(iou.mean()),
            "map": float(torch.cat(self.ap).mean()) if self.ap else 0.0,
        }
