"""Per-image agreement of heatmaps with a known object mask, batched on the device."""

from __future__ import annotations

import torch

from ..ops import minmax, upsample
from .registry import MASK_METRICS

__all__ = ["MASK_METRICS", "mask_metrics"]


def mask_metrics(heat: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores of (B, h, w) heatmaps against (B, H, W) boolean masks.

    The heatmap is upsampled bilinearly to the mask and min-max scaled (docs/methods.md, Evaluation):
    ``foreground_iou``: foreground (heat > mean) vs mask; ``pointing_game``: 1 if the hottest pixel is in the
    mask; ``mass_in_mask``: share of the total relevance that falls inside the mask.
    """
    h = minmax(upsample(heat, tuple(mask.shape[-2:])))
    m = mask.bool()
    fg = h > h.mean(dim=(1, 2), keepdim=True)
    inter = (fg & m).sum(dim=(1, 2)).float()
    union = (fg | m).sum(dim=(1, 2)).float()
    iou = inter / union.clamp(min=1)
    flat = h.flatten(1)
    hit = m.flatten(1).gather(1, flat.argmax(1, keepdim=True)).squeeze(1).float()
    mass = (h * m).sum(dim=(1, 2)) / h.sum(dim=(1, 2)).clamp(min=1e-12)
    return {"foreground_iou": iou, "pointing_game": hit, "mass_in_mask": mass}
