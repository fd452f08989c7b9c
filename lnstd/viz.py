"""Pictures of heatmaps: overlays on the original image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .ops import minmax, upsample

__all__ = ["colorize", "overlay"]

# Control points of matplotlib's perceptually uniform "inferno" map (dark -> bright).
_INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB with the inferno colormap."""
    x = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (x - lo)[..., None]
    rgb = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend a (h, w) token-grid heatmap onto ``image``: upsampled bilinearly, min-max scaled.

    Args:
        image: the original picture (any size; the map is stretched over all of it).
        heat: (h, w) heatmap, e.g. ``explain(...)[i]``.
        alpha: weight of the heatmap colours.
    """
    image = image.convert("RGB")
    w, h = image.size
    scaled = minmax(upsample(heat.detach().float().cpu()[None], (h, w)))[0].numpy()
    colours = colorize(scaled).astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8))
