"""The one preprocessing path: image, mask and the heatmap's way back to the original pixels.

A :class:`Preprocess` turns an image into the model's input by resizing one rectangle of it, the
``box`` (the whole image for ``fit="resize"``, the centred crop for ``fit="center-crop"``), to the
model's input size, then normalising. The same box is used for the mask (nearest neighbour) and, in
reverse, to put a heatmap back onto the original image, so all three always agree. The box is
recorded with every output row (``crop_box``), so a reader can map a heatmap onto the original
image without this code: heatmap cell (r, c) of a ``grid_h x grid_w`` map covers the original
pixels ``left + (c + [0, 1]) * (right - left) / grid_w`` by ``top + (r + [0, 1]) * (bottom - top) /
grid_h``.

The job, ``lnstd eval``, ``lnstd explain``, the report and ``--save-png`` all use this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..choices import FITS, Fit
from ..ops import minmax, upsample
from .decode import MAX_IMAGE_PIXELS, DecodeError, decode_image

__all__ = ["Geometry", "Preprocess", "input_size", "transform_for"]

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


@dataclass(frozen=True)
class Geometry:
    """How one model input maps back to its original image.

    Attributes:
        width, height: the original image's size (after EXIF orientation).
        box: (left, top, right, bottom) in original pixels: the rectangle the model input shows.
    """

    width: int
    height: int
    box: tuple[float, float, float, float]


class Preprocess:
    """Image (and mask) -> normalised model input, recording the geometry.

    Args:
        size: the model's input (height, width).
        mean, std: per-channel normalisation (of values in [0, 1]).
        interpolation: resampling filter name (timm's data config: ``bicubic`` for most ViTs).
        fit: ``"resize"`` stretches the whole image to the input, so a heatmap covers all of it;
            ``"center-crop"`` takes the centred square-ish crop that timm's evaluation transform
            takes (short side scaled to ``size / crop_pct``, then the centre).
        crop_pct: timm's crop fraction for ``center-crop``.
        draft: decode JPEGs at a reduced DCT scale when the box is much larger than the input
            (benchmarks/README.md measures the speed and the difference to a full decode).
        reducing_gap: PIL's ``reducing_gap`` for large downscales (None: exact resampling).
        max_pixels: larger pictures (width x height) are refused (``--max-image-pixels``; None:
            Pillow's guard, :data:`lnstd.data.decode.MAX_IMAGE_PIXELS`).
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        interpolation: str = "bicubic",
        fit: Fit = "resize",
        crop_pct: float = 1.0,
        draft: bool = True,
        reducing_gap: float | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {interpolation!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.interpolation = interpolation
        self.fit = fit
        self.crop_pct = float(crop_pct)
        self.draft = draft
        self.reducing_gap = reducing_gap
        self.max_pixels = int(max_pixels or MAX_IMAGE_PIXELS)

    @classmethod
    def for_model(cls, model: nn.Module, fit: Fit = "resize", **kwargs: object) -> Preprocess:
        """The model's own input size, normalisation, interpolation and crop fraction (timm's data
        config)."""
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        return cls(
            input_size(model),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            fit=fit,
            crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0),
            **kwargs,  # type: ignore[arg-type]
        )

    # --- geometry --------------------------------------------------------------------------------
    def geometry(self, width: int, height: int) -> Geometry:
        """The box of an image of this size that becomes the model input."""
        if self.fit == "resize":
            return Geometry(width, height, (0.0, 0.0, float(width), float(height)))
        th, tw = self.size
        # timm's eval transform: scale so the input is crop_pct of the short side, then centre-crop
        scale = max(th / height, tw / width) / self.crop_pct
        bw, bh = min(width, tw / scale), min(height, th / scale)
        left, top = (width - bw) / 2.0, (height - bh) / 2.0
        return Geometry(width, height, (left, top, left + bw, top + bh))

    def _needed(self, width: int, height: int) -> tuple[int, int] | None:
        """Smallest decoded size at which the box still has at least the input's resolution."""
        if not self.draft:
            return None
        left, top, right, bottom = self.geometry(width, height).box
        s = max(self.size[1] / (right - left), self.size[0] / (bottom - top))
        return max(1, math.ceil(width * s)), max(1, math.ceil(height * s))

    # --- images ----------------------------------------------------------------------------------
    def decode(self, data: bytes) -> tuple[Image.Image, Geometry]:
        """Bytes -> (decoded RGB picture, possibly at a reduced scale; its geometry)."""
        img, width, height = decode_image(data, draft=self._needed, max_pixels=self.max_pixels)
        return img, self.geometry(width, height)

    def pixels_tensor(self, pixels: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """Decoded uint8 (3, H, W) pixels at the original size, on any device (the GPU decoder's
        output) -> normalised input: the box cropped (to whole pixels) and resized with
        antialiasing on that device."""
        import torchvision.transforms.v2.functional as TF

        left, top, right, bottom = geom.box
        x0, y0 = round(left), round(top)
        w, h = max(1, round(right) - x0), max(1, round(bottom) - y0)
        mode = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR}.get(
            self.interpolation, TF.InterpolationMode.BICUBIC
        )
        out = TF.resized_crop(pixels, y0, x0, h, w, list(self.size), interpolation=mode, antialias=True)
        return self.normalize(out.clamp(0, 255) if out.is_floating_point() else out)

    @staticmethod
    def decode_full(data: bytes, max_pixels: int | None = None) -> Image.Image:
        """Bytes -> the RGB picture at its original size (for pictures of the result)."""
        return decode_image(data, max_pixels=max_pixels)[0]

    def resized(self, img: Image.Image, geom: Geometry) -> Image.Image:
        """The box of ``img`` resized to the input size (``img`` may be a reduced-scale decode)."""
        sx, sy = img.width / geom.width, img.height / geom.height
        left, top, right, bottom = geom.box
        return img.resize(
            (self.size[1], self.size[0]),
            _RESAMPLE[self.interpolation],
            box=(left * sx, top * sy, right * sx, bottom * sy),
            reducing_gap=self.reducing_gap,
        )

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> normalised float32, on the pixels' device."""
        x = pixels.float() / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def tensor(self, img: Image.Image, geom: Geometry) -> torch.Tensor:
        """PIL picture and its geometry -> normalised (3, H, W) float32."""
        arr = np.asarray(self.resized(img.convert("RGB"), geom))
        return self.normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1))

    def load(self, data: bytes) -> tuple[torch.Tensor, Geometry]:
        """Image bytes -> (normalised (3, H, W) input, geometry)."""
        img, geom = self.decode(data)
        return self.tensor(img, geom), geom

    def from_array(self, arr: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """An (H, W, 3) uint8 array -> (normalised input, geometry)."""
        geom = self.geometry(arr.shape[1], arr.shape[0])
        return self.tensor(Image.fromarray(arr, "RGB"), geom), geom

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A PIL picture -> normalised (3, H, W) input (torchvision-transform style)."""
        return self.tensor(img, self.geometry(img.width, img.height))

    # --- masks and heatmaps ---------------------------------------------------------------------
    def mask(self, mask: np.ndarray, geom: Geometry) -> torch.Tensor:
        """An (H, W) boolean mask of the original image -> (h, w) bool at the input size, through
        the same box (nearest neighbour).

        Raises:
            DecodeError: the mask's size is not the image's.
        """
        if mask.shape != (geom.height, geom.width):
            raise DecodeError(
                "mask size differs from the image",
                f"{mask.shape[1]}x{mask.shape[0]} vs {geom.width}x{geom.height}",
            )
        m = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (self.size[1], self.size[0]), Image.NEAREST, box=geom.box
        )
        return torch.from_numpy(np.asarray(m) > 0)

    @staticmethod
    def heat_to_image(heat: torch.Tensor, geom: Geometry, size: tuple[int, int] | None = None) -> np.ndarray:
        """A (h, w) token-grid heatmap -> float32 (H, W) map over the original image (or over a
        copy of it resized to ``size`` = (width, height)): bilinear inside the box, min-max scaled
        to [0, 1] there, NaN outside the box (pixels the model never saw)."""
        width, height = size or (geom.width, geom.height)
        sx, sy = width / geom.width, height / geom.height
        left, top, right, bottom = geom.box
        x0, y0 = round(left * sx), round(top * sy)
        x1, y1 = max(x0 + 1, round(right * sx)), max(y0 + 1, round(bottom * sy))
        inner = minmax(upsample(torch.as_tensor(heat).detach().float().cpu()[None], (y1 - y0, x1 - x0)))[0]
        out = np.full((height, width), np.nan, dtype=np.float32)
        out[y0:y1, x0:x1] = inner.numpy()
        return out


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model takes: its patch embedding's image size, else its pretrained config."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[1:])  # type: ignore[return-value]


def transform_for(model: nn.Module, fit: Fit = "resize") -> Preprocess:
    """PIL image -> normalised (3, H, W) tensor with the model's own timm data config.

    The same preprocessing as the job (:class:`Preprocess`): ``fit="resize"``
    stretches the whole image to the input size, so a heatmap maps back onto all of it;
    ``"center-crop"`` takes timm's evaluation crop.
    """
    return Preprocess.for_model(model, fit)
