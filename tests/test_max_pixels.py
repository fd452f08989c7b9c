"""``--max-image-pixels``: pictures over the limit are refused (error rows in `run`, skipped by
`explain`) and the limit can be raised past Pillow's own guard."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lnstd.data import DecodeError, decode_image
from lnstd.data.decode import MAX_IMAGE_PIXELS, jpeg_header

from .jobhelpers import huge_png, model_flags, run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)


def _png(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(w * h)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_default_is_pillows_guard():
    assert MAX_IMAGE_PIXELS == 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS's documented default


def test_a_lowered_limit_refuses_larger_pictures_only():
    assert decode_image(_png(30, 30), max_pixels=900)[1:] == (30, 30)  # exactly at the limit
    for fmt in ("PNG", "JPEG"):
        with pytest.raises(DecodeError) as err:
            decode_image(_png(31, 30, fmt), max_pixels=900)
        assert err.value.reason == "image too large to decode safely"
        assert "31x30 = 930 pixels" in err.value.detail and "--max-image-pixels" in err.value.detail
    with pytest.raises(DecodeError, match="930 pixels"):
        jpeg_header(_png(31, 30, "JPEG"), max_pixels=900)


def test_a_raised_limit_lets_a_picture_past_pillows_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    with pytest.raises(DecodeError) as err:  # 40000 x 40000 = 1.6e9 pixels: refused by default
        decode_image(huge_png())
    assert err.value.reason == "image too large to decode safely"
    with pytest.raises(DecodeError) as err:  # allowed now: its (fake) pixel data is what fails
        decode_image(huge_png(), max_pixels=2_000_000_000)
    assert err.value.reason == "corrupt or truncated image"
    assert decode_image(_png(30, 30))[1:] == (30, 30)


def test_explain_skips_pictures_over_the_limit(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "small.png").write_bytes(_png(30, 30))
    (tmp_path / "in" / "big.png").write_bytes(_png(50, 30))
    r = run_cli("explain", str(tmp_path / "in"), *model_flags(ckpt), "--methods", "gae", "--out",
                str(tmp_path / "out"), "--max-image-pixels", "1000")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "skipped" in r.stderr and "big.png" in r.stderr and "1,500 pixels" in r.stderr
    assert (tmp_path / "out" / "tiny" / "small_gae.png").is_file()
    assert not (tmp_path / "out" / "tiny" / "big_gae.png").exists()


@pytest.mark.integration
@pytest.mark.slow  # a whole job, about 25 s; the limit itself is unit-tested above
def test_run_passes_the_limit_to_its_actors(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    (tmp_path / "in").mkdir()
    sizes = {"a.png": (30, 30), "b.png": (40, 30), "c.jpg": (20, 20)}
    for name, (w, h) in sizes.items():
        (tmp_path / "in" / name).write_bytes(_png(w, h, "JPEG" if name.endswith("jpg") else "PNG"))
    r = run_cli("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *model_flags(ckpt),
                "--methods", "gae", "--no-progress", "--no-report", "--cpus-per-actor", "0.5",
                "--max-image-pixels", "1000")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pq.read_table(tmp_path / "out" / "heatmaps", columns=["image_id", "status", "error"]).to_pylist()
    status = {row["image_id"]: (row["status"], row["error"]) for row in rows}
    assert status == {"a.png": ("ok", None), "c.jpg": ("ok", None),
                      "b.png": ("error", "image too large to decode safely")}  # fmt: skip
