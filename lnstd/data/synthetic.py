"""Synthetic images with exact object masks: the embedded demo's data (deterministic by seed)."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_sample", "write_dataset"]

SHAPES = ("disc", "square", "triangle")


def make_sample(rng: np.random.Generator, size: int = 96) -> tuple[Image.Image, np.ndarray, int]:
    """One cluttered image with one shape: (RGB image, bool mask, class index)."""
    noise = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise + np.uint8(rng.integers(40, 120)), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):  # distractor strokes
        pts = rng.integers(0, size, 4).tolist()
        draw.line(pts, fill=tuple(rng.integers(0, 255, 3).tolist()), width=2)
    label = int(rng.integers(len(SHAPES)))
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    mask_img = Image.new("L", (size, size), 0)
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    for target, fill in ((draw, colour), (ImageDraw.Draw(mask_img), 255)):
        if label == 0:
            target.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif label == 1:
            target.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            target.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, np.asarray(mask_img) > 0, label


def write_dataset(folder: str, n: int = 48, size: int = 96, seed: int = 0) -> str:
    """Write ``n`` images, their masks and ``manifest.csv`` (uri, label, mask_uri) into ``folder``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label", "mask_uri"])
        for i in range(n):
            img, mask, label = make_sample(rng, size)
            name = f"{i:04d}"
            img.save(os.path.join(folder, "images", f"{name}.jpg"), quality=92)
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, "masks", f"{name}.png"))
            w.writerow([f"images/{name}.jpg", label, f"masks/{name}.png"])
    return manifest
