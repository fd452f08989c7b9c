"""Pictures of heatmaps: overlays on the original image, mask contours, side-by-side strips."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.preprocess import Geometry, Preprocess

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


def contour(
    image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 128), width: int = 1
) -> Image.Image:
    """Draw the boundary of a boolean mask (resized to the image, nearest) onto a copy of ``image``,
    ``width`` pixels wide (inside the mask)."""
    w, h = image.size
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    inner = m.copy()
    for _ in range(max(1, width)):  # erode once per pixel of width
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    edge = m & ~inner
    out = np.asarray(image.convert("RGB")).copy()
    out[edge] = color
    return Image.fromarray(out)


def overlay(
    image: Image.Image,
    heat: torch.Tensor,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
    geometry: Geometry | None = None,
) -> Image.Image:
    """Blend a (h, w) token-grid heatmap onto ``image``: upsampled bilinearly, min-max scaled.

    Args:
        image: the original picture, or a resized copy of it (thumbnails).
        heat: (h, w) heatmap, e.g. ``explain(...)[i]``.
        alpha: weight of the heatmap colours.
        mask: optional boolean object mask; its outline is drawn on top.
        geometry: where the model input came from in the original image (the ``crop_box`` of a
            row, :class:`~lnstd.data.preprocess.Geometry`); the map covers that box only and the
            rest is dimmed. None: the map covers the whole image (``--fit resize``).
    """
    image = image.convert("RGB")
    w, h = image.size
    if geometry is None:
        geometry = Geometry(w, h, (0.0, 0.0, float(w), float(h)))
    scaled = Preprocess.heat_to_image(heat, geometry, size=(w, h))
    inside = ~np.isnan(scaled)
    colours = colorize(np.nan_to_num(scaled)).astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    blended = base * (1 - alpha) + colours * alpha
    out = np.where(inside[..., None], blended, base * 0.35)  # outside the input: dimmed, no colour
    pic = Image.fromarray(out.round().astype(np.uint8))
    return contour(pic, mask) if mask is not None else pic


def strip(
    image: Image.Image,
    heatmaps: dict[str, torch.Tensor],
    height: int = 192,
    mask: np.ndarray | None = None,
    geometry: Geometry | None = None,
) -> Image.Image:
    """The image and one overlay per method side by side, each titled, at a common height
    (``geometry`` as in :func:`overlay`); no panel is wider than 4 x ``height`` (a very wide image
    is drawn lower instead: a 4000 x 20 banner would otherwise be 38,400 px wide per panel)."""
    w0, h0 = image.size
    width = max(1, round(w0 * height / h0))
    if width > 4 * height:
        width, height = 4 * height, max(1, round(h0 * 4 * height / w0))
    base = image.convert("RGB").resize((width, height), Image.BILINEAR)
    panels = [("image", contour(base, mask) if mask is not None else base)]
    panels += [(name, overlay(base, heat, mask=mask, geometry=geometry)) for name, heat in heatmaps.items()]
    title = 18
    out = Image.new("RGB", (len(panels) * (width + 4) - 4, height + title), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, (name, panel) in enumerate(panels):
        x = k * (width + 4)
        out.paste(panel, (x, title))
        draw.text((x + 2, 3), name, fill=(0, 0, 0), font=font)
    return out
