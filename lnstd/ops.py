"""Explicit post-processing steps for heatmaps: upsampling to pixels and per-image min-max."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["minmax", "upsample"]


def upsample(heat: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) token-grid maps to (B, H, W) pixels."""
    if isinstance(size, int):
        size = (size, size)
    return F.interpolate(heat[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


# A spread of at most this many float32 units in the last place of a map's magnitude is rounding:
# bilinear upsampling of a constant map spreads it by up to 2 (measured over sizes and values).
ROUNDING_ULPS = 4


def minmax(heat: torch.Tensor) -> torch.Tensor:
    """Scale each map of (B, ...) to [0, 1]; constant maps become all zeros.

    A map whose spread is what float32 cannot resolve (``ROUNDING_ULPS`` units of float32 precision
    of its magnitude, as bilinear upsampling of a constant map produces) counts as constant, rather
    than having its rounding stretched; any larger spread is signal and is stretched.
    """
    flat = heat.reshape(heat.shape[0], -1).float()
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    resolution = ROUNDING_ULPS * torch.finfo(torch.float32).eps
    constant = span <= resolution * flat.abs().amax(dim=1, keepdim=True)
    out = (flat - lo) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, torch.zeros_like(out), out).reshape(heat.shape)
