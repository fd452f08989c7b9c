"""The known-answer benchmark's data: shapes of K classes on cluttered backgrounds, exact masks.

The label depends only on the object's shape (colour, texture, size and position are random), the
background carries distractor strokes and blobs, and every sample is deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TOY_CLASSES", "ToySample", "toy_batch", "toy_sample"]

TOY_CLASSES = ("disc", "square", "triangle", "cross")


@dataclass
class ToySample:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # one (H, W) bool mask per object
    labels: list[int]  # one class per object


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _shape(draw: ImageDraw.ImageDraw, label: int, cx: int, cy: int, r: int, fill) -> None:
    if label == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == 1:
        q = int(r * 0.85)
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif label == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + int(0.8 * r)), (cx + r, cy + int(0.8 * r))], fill=fill)
    else:
        t = max(2, r // 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def _background(rng: np.random.Generator, size: int, clutter: float = 1.0) -> Image.Image:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    grad = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    bg = a * (1 - grad) + b * grad + rng.normal(0, 10 * clutter, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if clutter <= 0:
        return img
    for _ in range(int(rng.integers(3, 7) * clutter)):  # distractor strokes
        draw.line(rng.integers(0, size, 4).tolist(), fill=_colour(rng), width=1)
    for _ in range(int(rng.integers(2, 5) * clutter)):  # distractor blobs, much smaller than any object
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        s = int(rng.integers(1, 3))
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=_colour(rng))
    return img


def toy_sample(
    rng: np.random.Generator, size: int = 64, n_objects: int = 1, clutter: float = 1.0
) -> ToySample:
    """One image with ``n_objects`` objects of distinct classes, non-overlapping, with exact masks.

    ``clutter`` scales background noise and the number of distractors (1 = the benchmark's level;
    lower values are for a training curriculum).
    """
    img = _background(rng, size, clutter)
    labels = [int(v) for v in rng.choice(len(TOY_CLASSES), size=n_objects, replace=False)]
    masks: list[np.ndarray] = []
    taken = np.zeros((size, size), bool)
    for label in labels:
        for _ in range(100):
            r = int(rng.integers(int(size * 0.2), int(size * (0.32 if n_objects == 1 else 0.22)) + 1))
            cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
            m_img = Image.new("L", (size, size), 0)
            _shape(ImageDraw.Draw(m_img), label, cx, cy, r, 255)
            mask = np.asarray(m_img) > 0
            if not (mask & taken).any():
                break
        taken |= mask
        fill = Image.new("RGB", (size, size), _colour(rng))
        if rng.random() < 0.3:  # striped texture
            stripes = np.asarray(fill).copy()
            period = int(rng.integers(3, 7))
            axis = int(rng.integers(2))
            idx = np.arange(size)
            band = (idx // period) % 2 == 0
            stripes[band if axis == 0 else slice(None), slice(None) if axis == 0 else band] = _colour(rng)
            fill = Image.fromarray(stripes)
        img.paste(fill, (0, 0), Image.fromarray(mask.astype(np.uint8) * 255))
        masks = [m & ~mask for m in masks]  # an object drawn later hides what it covers
        masks.append(mask)
    return ToySample(np.asarray(img), masks, labels)


def toy_batch(
    n: int, seed: int, size: int = 64, n_objects: int = 1, clutter: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples: images (n, H, W, 3) uint8, masks (n, n_objects, H, W) bool, labels (n, n_objects)."""
    rng = np.random.default_rng(seed)
    samples = [toy_sample(rng, size, n_objects, clutter) for _ in range(n)]
    return (
        np.stack([s.image for s in samples]),
        np.stack([np.stack(s.masks) for s in samples]),
        np.array([s.labels for s in samples]),
    )
