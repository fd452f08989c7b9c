"""Pictures of heatmaps: overlays on the original image, mask contours, side-by-side strips."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .ops import minmax, upsample

__all__ = ["colorize", "contour", "overlay", "strip"]

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


def contour(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 128)) -> Image.Image:
    """Draw the boundary of a boolean mask (resized to the image, nearest) onto a copy of ``image``."""
    w, h = image.size
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    out = np.asarray(image.convert("RGB")).copy()
    out[edge] = color
    return Image.fromarray(out)


def overlay(
    image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, mask: np.ndarray | None = None
) -> Image.Image:
    """Blend a (h, w) token-grid heatmap onto ``image``: upsampled bilinearly, min-max scaled.

    Args:
        image: the original picture (any size; the map is stretched over all of it, which is
            right for ``--fit resize``, the default).
        heat: (h, w) heatmap, e.g. ``explain(...)[i]``.
        alpha: weight of the heatmap colours.
        mask: optional boolean object mask; its outline is drawn on top.
    """
    image = image.convert("RGB")
    w, h = image.size
    scaled = minmax(upsample(torch.as_tensor(heat).detach().float().cpu()[None], (h, w)))[0].numpy()
    colours = colorize(scaled).astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    out = Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8))
    return contour(out, mask) if mask is not None else out


def strip(
    image: Image.Image,
    heatmaps: dict[str, torch.Tensor],
    height: int = 192,
    mask: np.ndarray | None = None,
) -> Image.Image:
    """The image and one overlay per method side by side, each titled, at a common height."""
    w0, h0 = image.size
    width = max(1, round(w0 * height / h0))
    base = image.convert("RGB").resize((width, height), Image.BILINEAR)
    panels = [("image", contour(base, mask) if mask is not None else base)]
    panels += [(name, overlay(base, heat, mask=mask)) for name, heat in heatmaps.items()]
    title = 18
    out = Image.new("RGB", (len(panels) * (width + 4) - 4, height + title), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, (name, panel) in enumerate(panels):
        x = k * (width + 4)
        out.paste(panel, (x, title))
        draw.text((x + 2, 3), name, fill=(0, 0, 0), font=font)
    return out
