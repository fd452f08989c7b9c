"""Decode image bytes into RGB pictures, the way users expect, or say exactly why not.

Every error message is a short, stable reason (no paths, no object addresses), so that equal
problems group together in ``lnstd aggregate``; the file is named in the row's ``source``.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import one_line

__all__ = [
    "HEAD_BYTES",
    "MAX_IMAGE_PIXELS",
    "DecodeError",
    "check_limits",
    "decode_image",
    "decode_mask",
    "jpeg_header",
    "max_file_bytes",
]

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}
#: The largest picture decoded by default (width x height): Pillow's own guard against
#: decompression bombs, a small file that expands to gigabytes (89,478,485 pixels, ~0.27 GB as RGB).
#: ``--max-image-pixels`` changes it per run.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

#: How much of a file :func:`check_limits` looks at: enough for the header that states the size
#: (PNG's IHDR at byte 16; a JPEG's frame header, after its EXIF segment; WebP, BMP, GIF).
HEAD_BYTES = 64 * 1024
_BYTES_PER_PIXEL = 16  # four 32-bit channels, stored uncompressed: the widest pixel Pillow reads
_METADATA_BYTES = 64 * 1024 * 1024  # EXIF, ICC profiles, XMP: far above what cameras write
TOO_LARGE = "image too large to decode safely"


class DecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` is the stable text written to the error row and
    ``detail`` the decoder's own words (may vary from file to file)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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


def _clean(exc: BaseException) -> str:
    """The decoder's message on one line, without object reprs."""
    text = one_line(exc, 10_000)
    return type(exc).__name__ if " at 0x" in text or "<_io." in text else text[:200]


@contextlib.contextmanager
def _decoding(max_pixels: int) -> Iterator[None]:
    """PIL's ways of saying no, as :class:`DecodeError` with a stable reason (decompression bombs
    included: their warning is an error here). Pillow's process-wide limit is raised to
    ``max_pixels`` when that is larger (never lowered: :func:`_check_size` applies each caller's)."""
    _allow(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DecodeError:  # our own refusal (the size check), already in its words
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(TOO_LARGE, _clean(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("corrupt or truncated image", _clean(exc)) from None


def _allow(max_pixels: int) -> None:
    """Raise Pillow's process-wide guard to ``max_pixels`` if it is lower (never lower it: each
    caller's own limit is checked by :func:`_check_size` and :func:`check_limits`)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold an image of ``max_pixels`` pixels: 16 bytes a pixel (an
    uncompressed 4 x 32-bit pixel; PNG's and BMP's overheads are far below it) plus 64 MiB of
    metadata. A larger file cannot be an image within the limit (a multi-page TIFF aside)."""
    return _BYTES_PER_PIXEL * max_pixels + _METADATA_BYTES


def check_limits(head: bytes, size: int, max_pixels: int | None = None) -> None:
    """Refuse, before the file is read, an image that the decode limit would refuse anyway.

    Args:
        head: the file's first bytes (:data:`HEAD_BYTES` of them, or all of a smaller file).
        size: the file's size in bytes.
        max_pixels: the decode limit; Pillow's ``Image.MAX_IMAGE_PIXELS`` by default (None there:
            no limit).

    Raises:
        DecodeError: ``image too large to decode safely``: the file is larger than
            :func:`max_file_bytes`, or its header declares more pixels than the limit. A header
            that cannot be read from ``head`` says nothing here (the full decode judges the file).
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is None:
        return
    _allow(limit)
    declared = _declared_size(head)
    if declared is not None and declared[0] * declared[1] > limit:
        width, height = declared
        raise DecodeError(TOO_LARGE, f"{width} x {height} pixels, more than the limit of {limit}")
    if size > max_file_bytes(limit):
        raise DecodeError(
            TOO_LARGE, f"a file of {size} bytes (at most {max_file_bytes(limit)} for {limit} pixels)"
        )


def _declared_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) as the header in ``head`` states them, or None when it does not tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller judges
            return Image.open(io.BytesIO(head)).size
    except Image.DecompressionBombError as exc:
        raise DecodeError(TOO_LARGE, _clean(exc)) from None
    except Exception:  # an unreadable or incomplete header
        pass
    # Pillow opens a PNG only once it reaches the first image data; its size is in IHDR, at byte 16
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    return None


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(
            TOO_LARGE,
            f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(--max-image-pixels)",
        )


def decode_image(
    data: bytes,
    draft: Callable[[int, int], tuple[int, int] | None] | None = None,
    max_pixels: int | None = None,
) -> tuple[Image.Image, int, int]:
    """Bytes -> (RGB image, original width, original height), orientation fixed from EXIF.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted to
    8-bit RGB.

    Args:
        data: the file's bytes.
        draft: optional function of the original (displayed) width and height giving the smallest
            size the caller needs; JPEGs are then decoded at a reduced scale (libjpeg's DCT
            scaling, 1/2 to 1/8) no smaller than that. The returned image may therefore be
            smaller than the original; its original size is returned alongside.
        max_pixels: larger pictures (width x height) are refused before their pixels are read
            (None: :data:`MAX_IMAGE_PIXELS`).

    Raises:
        DecodeError: not an image, truncated, corrupt, empty, or too large to decode safely.
    """
    if not data:
        raise DecodeError("empty file")
    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    with _decoding(max_pixels):
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        _check_size(width, height, max_pixels)
        rotated = img.getexif().get(0x0112) in _ROTATING_ORIENTATIONS
        if rotated:
            width, height = height, width
        if draft is not None and img.format == "JPEG":
            need = draft(width, height)
            if need is not None:
                img.draft("RGB", (need[1], need[0]) if rotated else need)
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    if width < 1 or height < 1:
        raise DecodeError("image has no pixels")
    return rgb, width, height


def jpeg_header(data: bytes, max_pixels: int | None = None) -> tuple[int, int, bool] | None:
    """(displayed width, height, plain) of a JPEG from its header alone, or None if not a JPEG.

    ``plain`` is True for a baseline RGB or grayscale JPEG without EXIF rotation, the kind a
    GPU decoder handles exactly; anything else (CMYK, rotated) should take the CPU path. A JPEG
    over ``max_pixels`` is refused as :func:`decode_image` refuses it.
    """
    if data[:2] != b"\xff\xd8":
        return None
    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    with _decoding(max_pixels):
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        _check_size(width, height, max_pixels)
        orientation = img.getexif().get(0x0112, 1)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return width, height, img.mode in ("RGB", "L") and orientation in (None, 1)


def decode_mask(data: bytes) -> np.ndarray:
    """Mask image bytes -> (H, W) bool array, foreground = non-zero, EXIF orientation applied."""
    if not data:
        raise DecodeError("unreadable mask", "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DecodeError("unreadable mask", _clean(exc)) from None
    return arr > 0
