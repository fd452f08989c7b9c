"""Photo-like JPEGs for the benchmarks: ImageNet-like sizes (about 500x375), quality 90.

White noise is a poor stand-in for a photo: JPEG cannot compress it, so files come out 3-4x larger
than real ones and decode slower per pixel. These pictures mix what photos have: a smooth colour
field (sky, walls), a few soft-edged shapes (objects, with edges the DCT must code), mid-frequency
texture (grass, fabric) and a little sensor noise. At quality 90 they come out near ImageNet's
average file size (roughly 100-150 KB at 500x375).

    from photos import photo_jpegs, write_photos
    payloads = photo_jpegs(64)                      # list of JPEG bytes, deterministic
    write_photos(folder, 256)                       # 00000.jpg ... in folder
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["IMAGENET_SIZES", "photo", "photo_jpegs", "write_photos"]

# (width, height) and weight: the common ImageNet shapes (landscape 4:3 dominates).
IMAGENET_SIZES = (((500, 375), 0.55), ((375, 500), 0.15), ((500, 333), 0.15), ((500, 500), 0.05),
                  ((333, 500), 0.05), ((640, 480), 0.05))  # fmt: skip


def photo(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """One deterministic photo-like RGB picture; ``size`` (width, height) or an ImageNet-like one."""
    rng = np.random.default_rng(seed)
    if size is None:
        sizes, weights = zip(*IMAGENET_SIZES, strict=True)
        size = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
    w, h = size
    # smooth colour field: a few random colours on a coarse grid, bicubic-upsampled
    coarse = rng.uniform(20, 235, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
    # soft-edged objects
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(-0.2, 0.9) * w, rng.uniform(-0.2, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.5))))
    arr = np.asarray(img, dtype=np.float32)
    # texture at several scales (1/f-like: coarser layers stronger), its strength varying over the
    # picture like textured and plain regions do
    amount = np.asarray(
        Image.fromarray(rng.uniform(0.2, 1.8, (3, 4)).astype(np.float32), "F").resize((w, h), Image.BICUBIC)
    )
    tex = rng.standard_normal((h, w), dtype=np.float32)
    tex *= 8.0
    for f, strength in ((8, 16.0), (4, 14.0), (2, 12.0)):
        layer = rng.standard_normal((max(2, h // f), max(2, w // f)), dtype=np.float32)
        layer *= strength
        tex += np.asarray(Image.fromarray(layer, "F").resize((w, h), Image.BILINEAR))
    tex *= amount
    arr += tex[..., None] * rng.uniform(0.6, 1.0, 3).astype(np.float32)
    # sensor noise
    noise = rng.standard_normal(arr.shape, dtype=np.float32)
    noise *= float(rng.uniform(3.0, 6.0))
    arr += noise
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _jpeg(seed: int, size: tuple[int, int] | None, quality: int) -> bytes:
    buf = io.BytesIO()
    photo(seed, size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_jpegs(
    n: int, seed: int = 0, size: tuple[int, int] | None = None, quality: int = 90, workers: int | None = None
) -> list[bytes]:
    """``n`` photo-like JPEGs (bytes), the same for the same arguments, made by ``workers`` forked
    processes (default: one per core; numpy holds the GIL in parts of the work). Call it before
    CUDA is initialised in the calling process."""
    workers = min(workers or os.cpu_count() or 1, max(1, n // 8))
    seeds = [seed * 1_000_003 + i for i in range(n)]
    if workers == 1 or sys.platform != "linux":
        return [_jpeg(s, size, quality) for s in seeds]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_jpeg, seeds, [size] * n, [quality] * n, chunksize=max(1, n // (4 * workers))))


def write_photos(folder: Path, n: int, seed: int = 0, size: tuple[int, int] | None = None) -> list[bytes]:
    """Write ``n`` photo-like JPEGs as ``folder/00000.jpg`` ...; returns their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    payloads = photo_jpegs(n, seed, size)
    for i, data in enumerate(payloads):
        (folder / f"{i:05d}.jpg").write_bytes(data)
    return payloads


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'WxH' -> (W, H); '' or None or 'imagenet' -> None (ImageNet-like mix)."""
    if not text or text == "imagenet":
        return None
    w, h = text.lower().split("x")
    return int(w), int(h)


if __name__ == "__main__":  # a look at a few: python benchmarks/photos.py /tmp/photos
    import time

    t0 = time.perf_counter()
    out = write_photos(Path(sys.argv[1] if len(sys.argv) > 1 else "photos"), 16)
    print(f"{len(out)} JPEGs, mean {np.mean([len(b) for b in out]) / 1024:.0f} KB, "
          f"{(time.perf_counter() - t0) / len(out) * 1000:.1f} ms each")  # fmt: skip
