"""Pictures and the report page: orientation of overlays, the explain command, the HTML report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lnstd.data.toy import write_toy_dataset as write_dataset
from lnstd.viz import overlay, strip

from .browser import visit
from .jobhelpers import model_flags, run_cli, tiny_checkpoint


def _hot(img: Image.Image, x: float, y: float) -> int:
    w, h = img.size
    return sum(img.getpixel((int(x * (w - 1)), int(y * (h - 1)))))


@pytest.mark.parametrize(("grid", "size"), [((3, 5), (100, 40)), ((6, 2), (30, 90)), ((4, 4), (64, 64))])
def test_overlay_top_left_is_top_left(grid, size):
    heat = torch.zeros(grid)
    heat[0, 0] = 1.0
    img = overlay(Image.new("RGB", size, (128, 128, 128)), heat, alpha=1.0)
    assert img.size == size
    corner = _hot(img, 0.0, 0.0)
    for x, y in ((1, 0), (0, 1), (1, 1), (0.5, 0.5)):
        assert corner > _hot(img, x, y) + 200, (x, y)


def test_strip_and_mask_contour():
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    mask = np.zeros((40, 80), bool)
    mask[10:30, 20:60] = True
    s = strip(img, {"a": torch.rand(2, 4), "b": torch.rand(2, 4)}, height=40, mask=mask)
    assert s.size == (3 * 80 + 2 * 4, 40 + 18)
    arr = np.asarray(s)[18:, :80]  # the image panel: black with a green outline
    assert (arr[10, 20:60] == [0, 255, 128]).all() and (arr[20, 40] == 0).all()


@pytest.mark.integration
def test_explain_command_writes_overlays_and_strip(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    write_dataset(str(tmp_path / "data"), n=3, size=48)
    (tmp_path / "data" / "images" / "broken.jpg").write_bytes(b"nope")
    r = run_cli("explain", str(tmp_path / "data" / "images"), *model_flags(ckpt), "--methods", "gae,lnstd",
                "--out", str(tmp_path / "png"))  # fmt: skip
    assert r.returncode == 1 and "skipped" in r.stderr and "broken.jpg" in r.stderr
    for stem in ("0000", "0001", "0002"):
        for m in ("gae", "lnstd"):
            assert Image.open(tmp_path / "png" / "tiny" / f"{stem}_{m}.png").size == (48, 48)
        assert Image.open(tmp_path / "png" / "tiny" / f"{stem}_strip.png").size[0] > 3 * 48
    # a second model's overlays go next to the first's, not over them
    first = (tmp_path / "png" / "tiny" / "0000_gae.png").read_bytes()
    other = tmp_path / "other.safetensors"
    other.write_bytes(ckpt.read_bytes())
    flags = [f if f != str(ckpt) else str(other) for f in model_flags(ckpt)]
    r = run_cli("explain", str(tmp_path / "data" / "images" / "0000.png"), *flags, "--methods", "gae",
                "--out", str(tmp_path / "png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "png" / "other" / "0000_gae.png").exists()
    assert (tmp_path / "png" / "tiny" / "0000_gae.png").read_bytes() == first


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    ckpt = tiny_checkpoint(tmp)
    manifest = write_dataset(str(tmp / "data"), n=30, size=64, seed=1)
    (tmp / "data" / "images" / "0003.png").write_bytes(b"corrupt")  # one error row in the report
    out = tmp / "out"
    r = run_cli("run", "--input", manifest, "--output", str(out), *model_flags(ckpt), "--methods",
                "gae,lnstd,attention", "--no-progress", "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "_report.html").exists(), "lnstd run writes the report unless --no-report"
    return out


@pytest.mark.integration
def test_report_tables_are_the_means_of_the_rows(run_output, tmp_path):
    """The report's table and the aggregate's CSV hold each method's metric means and counts, as
    computed here from the Parquet rows with NumPy."""
    import pyarrow.csv as pacsv

    r = run_cli("report", str(run_output), "--samples", "6", "--out", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    agg = run_cli("aggregate", str(run_output))
    assert agg.returncode == 0
    rows = [r for r in pq.read_table(run_output / "heatmaps").to_pylist() if r["status"] == "ok"]
    summary = pacsv.read_csv(run_output / "_aggregate" / "summary.csv").to_pylist()
    cells = re.findall(
        r"data-method='([^']+)' data-metric='([^']+)' data-mean='([^']+)' data-count='(\d+)'", page
    )
    assert len(cells) == len(summary) == 3 * 6  # 3 methods x (probability, correct, 3 mask metrics, ms)
    for method, metric, mean, count in cells:
        values = [float(r[metric]) for r in rows if r["method"] == method and r[metric] is not None]
        assert int(count) == len(values) == 29
        assert float(mean) == pytest.approx(np.mean(values), rel=1e-6)
        row = next(s for s in summary if s["method"] == method and s["metric"] == metric)
        assert row["mean"] == pytest.approx(np.mean(values), rel=1e-6) and row["count"] == len(values)
    assert "30 images (29 ok, 1 error), 90 rows, 1 shard, 3 methods: attention, gae, lnstd" in agg.stdout
    assert re.search(r"error images</td><td[^>]*>1<", page)
    assert "not an image (unrecognised format)" in page


@pytest.mark.integration
def test_report_renders_in_chromium_without_network_or_errors(run_output, tmp_path):
    html = run_output / "_report.html"
    shot = tmp_path / "report.png"
    seen = visit(html, shot)
    assert seen.requests == [html.resolve().as_uri()], "the page asked for something besides itself"
    assert seen.console_errors == [] and seen.page_errors == []
    assert seen.images == 12 * (1 + 3)  # 12 gallery rows (default --samples), the image + 3 methods
    assert seen.broken_images == []
    img = Image.open(shot)
    assert img.size[0] >= 1300 and img.size[1] > 1500
    assert len(set(img.convert("L").resize((64, 64)).getdata())) > 20  # a page with content, not blank


@pytest.mark.integration
def test_report_plots_perturbation_curves_when_present(run_output, tmp_path):
    """An output with per-row curve columns gets one mean-curve plot per column."""
    import shutil

    import pyarrow as pa

    out = tmp_path / "with-curves"
    shutil.copytree(run_output, out)
    for part in (out / "heatmaps").glob("part-*.parquet"):
        t = pq.read_table(part)
        curves = [[1.0 - 0.1 * k * (i % 3) / 3 for k in range(10)] for i in range(t.num_rows)]
        pq.write_table(t.append_column("deletion_curve", pa.array(curves, pa.list_(pa.float32()))), part)
    r = run_cli("report", str(out), "--samples", "3")
    assert r.returncode == 0, r.stderr
    page = (out / "_report.html").read_text()
    assert "Perturbation curves" in page and "aria-label='deletion_curve'" in page
    assert page.count("<polyline") == 3  # one line per method
