"""Helpers for job tests: a tiny seeded checkpoint, image files good and bad, running the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lnstd

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "vit_tiny_patch16_224"
TINY_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5}


def tiny_checkpoint(folder: Path) -> Path:
    """A seeded tiny ViT saved as safetensors (every replica then holds the same weights)."""
    path = folder / "tiny.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = lnstd.load_model(TINY_MODEL, **TINY_ARGS)
        save_file(model.state_dict(), path)
    return path


def model_flags(ckpt: Path) -> list[str]:
    flags = ["--model", TINY_MODEL, "--checkpoint", str(ckpt)]
    for k, v in TINY_ARGS.items():
        flags += ["--model-arg", f"{k}={v}"]
    return flags


def good_image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(20, 70)), int(rng.integers(20, 70))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG" if i % 2 else "JPEG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png() -> bytes:
    """A valid PNG header claiming 40000 x 40000 pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 10)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bad_files() -> dict[str, bytes]:
    """Ten files that no image decoder should accept, by name (the extension claims an image)."""
    jpeg = good_image(0)
    png = good_image(1)
    return {
        "bad/truncated.jpg": jpeg[: len(jpeg) // 3],
        "bad/truncated.png": png[: len(png) // 2],
        "bad/random.jpg": os.urandom(500),
        "bad/empty.png": b"",
        "bad/text.png": b"this is not an image\n",
        "bad/html.webp": b"<html><body>404</body></html>",
        "bad/huge.png": huge_png(),
        "bad/zeros.bmp": b"\x00" * 64,
        "bad/garbage.tiff": b"II*\x00" + os.urandom(40),
        "bad/header-only.jpg": jpeg[:20],
    }


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lnstd ARGS`` in a fresh process; ``env`` values of None remove a variable."""
    return subprocess.run(
        [sys.executable, "-m", "lnstd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
        cwd=ROOT,
    )


def cli_in_process(*args: str) -> tuple[int, str]:
    """``lnstd ARGS`` in this process (for errors found before any work starts): (exit code, stderr).

    A command that would start or join Ray fails the test: a Ray driver inside the test process
    outlives its command in Ray's native state (a second ``ray.init`` to another module's head, or
    that head going away, can end the whole worker process without a word), so runs go through
    :func:`run_cli`, a process of their own as a user's."""
    from lnstd.cli import main

    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(err))
        ray = sys.modules.get("ray")
        if ray is None or getattr(ray.init, "__module__", "").startswith("ray."):  # not a test's stand-in
            import ray

            def refuse(*_args, **_kwargs):
                raise AssertionError(f"cli_in_process{args} started Ray: use run_cli")

            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(ray, "init", refuse)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return code, err.getvalue()


def read_rows(output: Path, columns: list[str] | None = None):
    return pq.read_table(output / "heatmaps", columns=columns).to_pylist()


def mask_scores_by_hand(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The three per-image mask columns from their definitions, with torch's interpolate and NumPy
    (not lnstd.metrics): heat (h, w) upsampled bilinearly to the mask (H, W), min-max scaled;
    foreground = above its mean."""
    import torch.nn.functional as F

    up = F.interpolate(torch.tensor(heat, dtype=torch.float32)[None, None], size=mask.shape,
                       mode="bilinear", align_corners=False)[0, 0].numpy().astype(np.float64)  # fmt: skip
    lo, hi = up.min(), up.max()
    up = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    fg = up > up.mean()
    iou = (fg & mask).sum() / max((fg | mask).sum(), 1)
    return {
        "foreground_iou": float(iou),
        "pointing_game": float(mask.flat[int(np.argmax(up))]),
        "mass_in_mask": float(up[mask].sum() / max(up.sum(), 1e-12)),
    }


def only_lease_files(out: Path) -> bool:
    """A fresh output whose run failed: nothing is left but the lease's own files (its lock is never
    deleted and its generation only grows), the lease released. True also when nothing was created."""
    if not out.exists():
        return True
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    if files != ["_lnstd/lease.json", "_lnstd/lease.lock"]:
        return False
    import json

    return json.loads((out / "_lnstd" / "lease.json").read_text())["released"] is True


@contextlib.contextmanager
def ray_head(num_cpus: int, env: Mapping[str, str | None]) -> Iterator[str]:
    """A Ray head node (``ray.cluster_utils.Cluster``, in a process of its own: see
    :mod:`tests.raycluster`) started with ``env`` set in its environment (None removes a variable);
    yields its address and shuts it down after."""
    from .raycluster import ClusterProcess

    with ClusterProcess({"num_cpus": num_cpus, "include_dashboard": False}, env) as cluster:
        yield cluster.address
