"""Decode image bytes into RGB pictures, the way users expect, or say exactly why not."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DecodeError", "decode_image", "decode_mask"]

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason written to the error row."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent pixels read as a white page
    return img.convert("RGB")


def decode_image(data: bytes, min_size: tuple[int, int] | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> (RGB image, original width, original height), orientation fixed from EXIF.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted to
    8-bit RGB. Large JPEGs are decoded at a reduced scale no smaller than ``min_size``.

    Raises:
        DecodeError: not an image, truncated, corrupt, empty, or too large to decode safely.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if img.getexif().get(0x0112) in _ROTATING_ORIENTATIONS:
                width, height = height, width
            if min_size is not None and img.format == "JPEG":
                img.draft("RGB", min_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    return rgb, width, height


def decode_mask(data: bytes) -> np.ndarray:
    """Mask image bytes -> (H, W) bool array, foreground = non-zero."""
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"unreadable mask: {exc}") from None
    return arr > 0
