"""JPEG decoding on the GPU (nvjpeg through ``torchvision.io.decode_jpeg``), one call per batch.

The geometry comes from the JPEG header (read on the CPU threads with the file); the pixels are
decoded, cropped, resized and normalised on the device, so they never cross to host memory.
Anything the GPU path does not handle exactly (not a JPEG, CMYK, EXIF rotation, a file nvjpeg
refuses) takes the CPU path of :class:`~lnstd.data.preprocess.Preprocess`, image by image, and a
file neither can read becomes that image's error.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .decode import DecodeError
from .preprocess import Preprocess

__all__ = ["decode_on_gpu"]


def decode_on_gpu(batch: list[Any], prep: Preprocess, device: torch.device) -> None:
    """Fill ``tensor`` (on ``device``) of every entry of ``batch`` that holds ``raw`` JPEG bytes.

    Entries are the job's ``Loaded`` records (``raw``, ``geometry``, ``tensor``, ``error``,
    ``detail``). ``device`` may be the CPU (same code path, for tests on machines without a GPU).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [b for b in batch if b.raw is not None]
    if not todo:
        return
    data = [torch.frombuffer(bytearray(b.raw), dtype=torch.uint8) for b in todo]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
        try:
            pixels: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
            pixels = []
            for d in data:
                try:
                    pixels.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    pixels.append(None)
    for b, px in zip(todo, pixels, strict=True):
        try:
            if px is None or tuple(px.shape[1:]) != (b.geometry.height, b.geometry.width):
                tensor, b.geometry = prep.load(b.raw)  # the CPU path decides
                b.tensor = tensor.to(device)
            else:
                b.tensor = prep.pixels_tensor(px, b.geometry)
        except DecodeError as exc:
            b.error, b.detail = exc.reason, exc.detail or None
        b.raw = None
