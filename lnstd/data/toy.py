"""The known-answer benchmark's data: textured objects of K classes on cluttered backgrounds, exact masks.

The label is the texture inside the object (horizontal, vertical or diagonal stripes, or a
checkerboard). Everything else is random and carries no label: the object's outline (disc, square,
triangle, cross), size, colours and stripe period, its position (anywhere, so it may be cut by the
border, which keeps a centre prior from scoring well), the background's colour ramp and
noise, thin distractor strokes and blobs, and a plain (untextured) distractor shape as large as an
object. So the evidence for the class lies inside the object's mask and nowhere else, which is what
the segmentation metrics reward. Every sample is deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TOY_CLASSES", "ToySample", "toy_batch", "toy_sample", "write_dataset", "write_toy_dataset"]

TOY_CLASSES = ("horizontal", "vertical", "checker", "diagonal")
OUTLINES = ("disc", "square", "triangle", "cross")


@dataclass
class ToySample:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # one (H, W) bool mask per object
    labels: list[int]  # one class per object


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the texture is visible."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(a - b).sum() >= 180:
            return a.astype(np.uint8), b.astype(np.uint8)


def _outline(draw: ImageDraw.ImageDraw, kind: int, cx: int, cy: int, r: int) -> None:
    if kind == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == 1:
        q = int(r * 0.85)
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + int(0.8 * r)), (cx + r, cy + int(0.8 * r))], fill=255)
    else:
        t = max(3, int(r * 0.45))
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)


def _texture(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A full-frame (size, size, 3) texture of class ``label`` with random colours, period and phase."""
    a, b = _colour_pair(rng)
    width = int(rng.integers(2, 4))  # band or cell width in pixels
    yy, xx = np.mgrid[0:size, 0:size] + rng.integers(0, 2 * width, 2)[:, None, None]
    if label == 0:
        on = (yy // width) % 2 == 0
    elif label == 1:
        on = (xx // width) % 2 == 0
    elif label == 2:
        on = (yy // width + xx // width) % 2 == 0
    else:
        d = (xx + yy) if rng.random() < 0.5 else (xx - yy + 4 * size)  # either diagonal: flip-invariant
        on = (d // width) % 2 == 0
    return np.where(on[..., None], a, b)


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


def _place(rng: np.random.Generator, size: int, taken: np.ndarray, r_max: float) -> np.ndarray:
    """A random outline's mask that does not touch ``taken`` (best effort after 100 tries); centres
    lie anywhere the outline stays at least about two-thirds visible."""
    for _ in range(100):
        r = int(rng.integers(int(size * 0.2), int(size * r_max) + 1))
        margin = r // 3
        cx, cy = (int(v) for v in rng.integers(margin, size - margin, 2))
        m_img = Image.new("L", (size, size), 0)
        _outline(ImageDraw.Draw(m_img), int(rng.integers(len(OUTLINES))), cx, cy, r)
        mask = np.asarray(m_img) > 0
        if not (mask & taken).any():
            break
    return mask


def toy_sample(
    rng: np.random.Generator,
    size: int = 64,
    n_objects: int = 1,
    clutter: float = 1.0,
) -> ToySample:
    """One image with ``n_objects`` textured objects of distinct classes, non-overlapping, exact masks.

    ``clutter`` scales background noise and the number of distractors (1 = the benchmark's level);
    with ``clutter > 0`` one plain-coloured distractor outline is added (before the objects) with
    probability 0.5 when there is room for it.
    """
    img = np.array(_background(rng, size, clutter))
    labels = [int(v) for v in rng.choice(len(TOY_CLASSES), size=n_objects, replace=False)]
    r_max = 0.32 if n_objects == 1 else 0.24
    taken = np.zeros((size, size), bool)
    objects: list[np.ndarray] = []
    for _ in labels:  # each object avoids all placed before it
        objects.append(_place(rng, size, taken, r_max))
        taken |= objects[-1]
    if clutter > 0 and rng.random() < 0.5:
        plain = _place(rng, size, taken, 0.22)
        if not (plain & taken).any():
            img[plain] = _colour(rng)
    masks: list[np.ndarray] = []
    for label, mask in zip(labels, objects, strict=True):
        img[mask] = _texture(rng, label, size)[mask]
        masks = [m & ~mask for m in masks]  # an object drawn later hides what it covers
        masks.append(mask)
    return ToySample(img, masks, labels)


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


def write_toy_dataset(folder: str, n: int = 48, seed: int = 0, size: int = 64) -> str:
    """Write ``n`` toy images (PNG), their masks and ``manifest.csv`` (uri, label, mask_uri) into
    ``folder``; returns the manifest's path. The demo of ``lnstd run`` and the job tests use it."""
    images, masks, labels = toy_batch(n, seed, size=size)
    return write_dataset(folder, images, masks, labels)


def write_dataset(folder: str, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> str:
    """Write generated images (N, H, W, 3) uint8, masks (N, 1, H, W) and labels (N, 1) as PNGs and
    ``manifest.csv`` (uri, label, mask_uri) into ``folder``; returns the manifest's path."""
    import csv
    import os

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label", "mask_uri"])
        for i in range(len(images)):
            name = f"{i:04d}"
            Image.fromarray(images[i]).save(os.path.join(folder, "images", f"{name}.png"))
            Image.fromarray(masks[i, 0].astype(np.uint8) * 255).save(
                os.path.join(folder, "masks", f"{name}.png")
            )
            w.writerow([f"images/{name}.png", int(labels[i, 0]), f"masks/{name}.png"])
    return manifest
