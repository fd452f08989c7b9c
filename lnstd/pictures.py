"""Overlay pictures for a few local image files (``lnstd explain``): one PNG per method, plus a strip.

Usable from Python::

    from lnstd.data.files import image_files
    from lnstd.pictures import explain_files

    model = lnstd.load_model("vit_small_patch16_224", pretrained=True)
    done = explain_files(image_files(["photos/"]), "pictures/vit", model, ["lnstd", "gae"])
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from .arch import get_adapter
from .choices import Capture, Fit, Precision
from .data import DecodeError
from .data.preprocess import Geometry, Preprocess
from .explainer import Explainer
from .methods import applicable_methods
from .viz import overlay, strip

__all__ = ["Explained", "explain_files"]


@dataclass
class Explained:
    """What :func:`explain_files` did.

    Attributes:
        methods: the methods drawn.
        written: the PNGs written, in order.
        skipped: (path, reason) of each file that could not be read or decoded.
    """

    methods: list[str]
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def explain_files(
    files: Sequence[tuple[str, str]],
    out_dir: str,
    model: nn.Module,
    methods: Sequence[str] | None = None,
    *,
    target: int | None = None,
    fit: Fit = "resize",
    batch_size: int = 16,
    precision: Precision = "fp32",
    capture: Capture | None = None,
    options: Mapping[str, Any] | None = None,
    max_pixels: int | None = None,
    log: Callable[[str], None] = _say,
    ready: Callable[[], None] | None = None,
) -> Explained:
    """Explain image files in batches and draw ``OUT_DIR/<stem>_<method>.png`` (the heatmap over
    the full-size image) and ``OUT_DIR/<stem>_strip.png`` (the image and every method side by side).

    Args:
        files: (path, output stem) pairs, e.g. from :func:`lnstd.data.files.image_files`.
        out_dir: folder for the PNGs (made as needed).
        model: the model to explain (see :class:`~lnstd.Explainer`).
        methods: method names; None: every method that applies to the model.
        target: a class index for every image; None: each image's predicted class.
        fit, batch_size, precision, capture, options: as for :class:`~lnstd.Explainer` and
            :class:`~lnstd.data.preprocess.Preprocess`.
        max_pixels: pictures larger than this (width x height) are skipped; None: Pillow's guard.
        log: receives one line per file that is skipped (unreadable or not an image).
        ready: called once every setting is checked, before the first file is read (the command
            line says there whether the model has random weights, after any refusal).

    Raises:
        OptionError, UnsupportedModelError: a method, option or capture that cannot be used,
            before any file is read.
    """
    methods = list(methods or applicable_methods(get_adapter(model)))
    explainer = Explainer(model, methods, precision=precision, capture=capture, **dict(options or {}))
    if ready is not None:
        ready()
    prep = Preprocess.for_model(model, fit, max_pixels=max_pixels)
    done = Explained(methods)
    for k in range(0, len(files), batch_size):
        batch: list[tuple[str, Image.Image, Image.Image, Geometry]] = []  # stem, input, full, geometry
        for path, stem in files[k : k + batch_size]:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                img, geom = prep.decode(data)
                # the pictures are drawn on the full-size image; decode again only if the model's
                # input came from a reduced-scale (JPEG draft) decode
                full = (
                    img if img.size == (geom.width, geom.height) else prep.decode_full(data, prep.max_pixels)
                )
                batch.append((stem, img, full, geom))
            except (DecodeError, OSError) as exc:
                done.skipped.append((path, str(exc)))
                log(f"lnstd: skipped {path}: {exc}")
        if not batch:
            continue
        out = explainer(torch.stack([prep.tensor(img, geom) for _, img, _, geom in batch]), target)
        for i, (stem, _, full, geom) in enumerate(batch):
            done.written += _draw(
                os.path.join(out_dir, stem), full, geom, {m: out.heatmaps[m][i] for m in methods}
            )
    return done


def _draw(stem: str, image: Image.Image, geom: Geometry, maps: dict[str, torch.Tensor]) -> list[str]:
    """One image's overlays and strip, written as ``<stem>_<method>.png`` and ``<stem>_strip.png``."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    written = []
    for m, heat in maps.items():
        overlay(image, heat, geometry=geom).save(f"{stem}_{m}.png")
        written.append(f"{stem}_{m}.png")
    strip(image, maps, geometry=geom).save(f"{stem}_strip.png")
    return [*written, f"{stem}_strip.png"]
