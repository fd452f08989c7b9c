"""The planted-evidence benchmark: the class is a small marker glyph, everything salient is a decoy.

Each 64 x 64 image holds one marker: a 5 x 5 glyph (plus, x, ring or diamond; the class) on a
7 x 7 pad of another colour, at a random position. Around it lie large, textured, salient shapes
(the toy set's outlines and stripe textures, their texture drawn at random) on the toy set's
cluttered background; they carry no label. The known answer (mask) is the marker's 7 x 7 box,
which is by construction the only evidence for the class. The marker is drawn last, so nothing
hides it, and never in the bottom-right corner, where the shortcut variant's watermark lives.

Planted-shortcut variant: a fixed watermark (a 6 x 6 white-on-black checker glyph in the
bottom-right corner) appears in most images of class ``SHORTCUT_CLASS`` and rarely in the others,
so a model can partly learn it instead of the marker. ``watermark="on"`` / ``"off"`` force it, to
measure that reliance.

Every image is deterministic by (seed, index); the label, the scene (background and decoys), the
marker's look and place, and the watermark come from four independent streams, so changing the
decoys never changes the label or the marker, and changing the label changes only the marker's box.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .toy import OUTLINES, _background, _colour_pair, _outline, _texture

__all__ = [
    "MARKER_BOX",
    "PLANTED_CLASSES",
    "PLANTED_DATASETS",
    "SHORTCUT_CLASS",
    "PlantedBatch",
    "planted_batch",
    "render",
    "sample_streams",
    "watermark_mask",
]

PLANTED_CLASSES = ("plus", "cross", "ring", "diamond")
PLANTED_DATASETS = ("planted", "planted-shortcut")
SHORTCUT_CLASS = 0  # the class the watermark co-occurs with
WATERMARK_RATES = (0.9, 0.05)  # P(watermark | shortcut class), P(watermark | any other class)
MARKER_BOX = 7  # the pad's side; the glyph is the inner 5 x 5
GRID_CELL = 8  # markers sit on this grid (the toy ViT's patch size)
WATERMARK_SIDE, WATERMARK_MARGIN = 6, 2

_GLYPHS = {
    "plus": ("..#..", "..#..", "#####", "..#..", "..#.."),
    "cross": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "ring": ("#####", "#...#", "#...#", "#...#", "#####"),
    "diamond": ("..#..", ".###.", "#####", ".###.", "..#.."),
}  # all mirror-symmetric left-right


def _glyph(label: int) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in _GLYPHS[PLANTED_CLASSES[label]]])


class PlantedBatch(NamedTuple):
    images: np.ndarray  # (n, H, W, 3) uint8
    masks: np.ndarray  # (n, 1, H, W) bool: the marker's box
    labels: np.ndarray  # (n, 1) int
    watermark: np.ndarray  # (n,) bool: whether the image carries the watermark


def watermark_mask(size: int = 64) -> np.ndarray:
    """(size, size) bool: the watermark's box (bottom-right corner)."""
    m = np.zeros((size, size), bool)
    lo, hi = size - WATERMARK_MARGIN - WATERMARK_SIDE, size - WATERMARK_MARGIN
    m[lo:hi, lo:hi] = True
    return m


def _watermark(img: np.ndarray) -> None:
    size = img.shape[0]
    lo = size - WATERMARK_MARGIN - WATERMARK_SIDE
    yy, xx = np.mgrid[0:WATERMARK_SIDE, 0:WATERMARK_SIDE]
    on = ((yy // 2 + xx // 2) % 2 == 0)[..., None]
    img[lo : lo + WATERMARK_SIDE, lo : lo + WATERMARK_SIDE] = np.where(on, 255, 0).astype(np.uint8)


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """The toy set's cluttered background with 2-3 large textured decoys (random texture, no label)."""
    img = np.array(_background(rng, size))
    for _ in range(int(rng.integers(2, 4))):
        r = int(rng.integers(int(size * 0.15), int(size * 0.28) + 1))
        cx, cy = (int(v) for v in rng.integers(r // 3, size - r // 3, 2))
        m_img = Image.new("L", (size, size), 0)
        _outline(ImageDraw.Draw(m_img), int(rng.integers(len(OUTLINES))), cx, cy, r)
        mask = np.asarray(m_img) > 0
        img[mask] = _texture(rng, int(rng.integers(4)), size)[mask]
    return img


def _marker_place(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Top-left corner of the marker's box: on the 8-pixel grid (the box fills one cell but its last
    row and column, so the marker is one token of the ViT's 8 x 8 patches and four of the Swin's 4 x 4
    ones: a tiny ViT learns a marker that straddles patches far more slowly, seen at chance after 6,000
    steps), anywhere but the watermark's corner (one place rule for both variants)."""
    corner = watermark_mask(size)
    cells = size // GRID_CELL
    while True:
        y, x = (GRID_CELL * int(v) for v in rng.integers(0, cells, 2))
        if not corner[y : y + MARKER_BOX, x : x + MARKER_BOX].any():
            return y, x


def render(
    label: int,
    scene_rng: np.random.Generator,
    marker_rng: np.random.Generator,
    watermark: bool = False,
    size: int = 64,
    marker: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its marker mask from explicit streams; ``marker=False`` draws the scene (and
    watermark) only, with the mask of where the marker would have been."""
    img = _scene(scene_rng, size)
    pad, ink = _colour_pair(marker_rng)
    y, x = _marker_place(marker_rng, size)
    mask = np.zeros((size, size), bool)
    mask[y : y + MARKER_BOX, x : x + MARKER_BOX] = True
    if marker:
        box = np.broadcast_to(pad, (MARKER_BOX, MARKER_BOX, 3)).copy()
        box[1:-1, 1:-1][_glyph(label)] = ink
        img[y : y + MARKER_BOX, x : x + MARKER_BOX] = box
    if watermark:
        _watermark(img)
    return img, mask


def sample_streams(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """The four independent streams of image ``index`` of split ``seed``: label, scene, marker,
    watermark."""
    children = np.random.SeedSequence([seed, index]).spawn(4)
    return tuple(np.random.default_rng(c) for c in children)


def planted_batch(
    n: int, seed: int, size: int = 64, shortcut: bool = False, watermark: str = "train"
) -> PlantedBatch:
    """``n`` planted images of split ``seed``; ``shortcut`` adds the watermark, drawn per
    ``watermark``: ``"train"`` (the co-occurrence rates), ``"on"`` or ``"off"`` (every image)."""
    if watermark not in ("train", "on", "off"):
        raise ValueError(f"watermark must be train, on or off, got {watermark!r}")
    images, masks, labels, marks = [], [], [], []
    for i in range(n):
        label_rng, scene_rng, marker_rng, mark_rng = sample_streams(seed, i)
        label = int(label_rng.integers(len(PLANTED_CLASSES)))
        rate = WATERMARK_RATES[0] if label == SHORTCUT_CLASS else WATERMARK_RATES[1]
        mark = shortcut and (watermark == "on" or (watermark == "train" and mark_rng.random() < rate))
        img, mask = render(label, scene_rng, marker_rng, mark, size)
        images.append(img)
        masks.append(mask[None])
        labels.append([label])
        marks.append(mark)
    return PlantedBatch(np.stack(images), np.stack(masks), np.array(labels), np.array(marks, bool))
