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
from lnstd.viz import contour, overlay, strip

from .browser import visit
from .jobhelpers import model_flags, run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)


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


def _cells(page: str, attr: str) -> list[tuple[str, str, float, int]]:
    return [
        (m, k, float(v), int(n))
        for m, k, v, n in re.findall(
            rf"data-method='([^']+)' data-{attr}='([^']+)' data-mean='([^']+)' data-count='(\d+)'", page
        )
    ]


@pytest.mark.integration
def test_report_tables_are_the_means_of_the_rows(run_output, tmp_path):
    """The report's per-method cells (time and mask metrics) and the aggregate's CSV hold each
    method's means and counts as computed here from the Parquet rows with NumPy; the per-image
    values (accuracy, probability) appear once, not once per method."""
    import pyarrow.csv as pacsv

    r = run_cli("report", str(run_output), "--samples", "6", "--out", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    agg = run_cli("aggregate", str(run_output))
    assert agg.returncode == 0
    rows = [r for r in pq.read_table(run_output / "heatmaps").to_pylist() if r["status"] == "ok"]
    summary = pacsv.read_csv(run_output / "_aggregate" / "summary.csv").to_pylist()
    assert len(summary) == 3 * 6  # 3 methods x (probability, correct, 3 mask metrics, ms)
    cells = _cells(page, "metric")
    assert len(cells) == 3 * 4  # per method: its time and the 3 mask metrics; nothing per image
    for method, metric, mean, count in cells:
        values = [float(r[metric]) for r in rows if r["method"] == method and r[metric] is not None]
        assert count == len(values) == 29
        assert mean == pytest.approx(np.mean(values), rel=1e-6)
        row = next(s for s in summary if s["method"] == method and s["metric"] == metric)
        assert row["mean"] == pytest.approx(np.mean(values), rel=1e-6) and row["count"] == len(values)
    # each method's own time: the three methods cost different amounts, not the batch time repeated
    ms = {m: v for m, k, v, _ in cells if k == "elapsed_ms"}
    assert len(set(ms.values())) == 3
    gae = [r for r in rows if r["method"] == "gae"]
    accuracy = np.mean([r["correct"] for r in gae])
    assert f"{accuracy:.3f} (n=29)" in page and page.count("accuracy (images with a label)") == 1
    assert f"{np.mean([r['probability'] for r in gae]):.4f}," in page
    assert "30 images (29 ok, 1 error), 90 rows, 1 shard, 3 methods: attention, gae, lnstd" in agg.stdout
    assert re.search(r"error images</td><td[^>]*>1<", page)
    assert "not an image (unrecognised format)" in page
    # the failed file is named, with its path
    assert str(run_output.parent / "data" / "images" / "0003.png") in page
    assert "id='random-weights'" not in page  # the run loaded a checkpoint


def _by_hand_concentration(heat: list[float]) -> tuple[float, float]:
    """Share of the min-max scaled map's mass in its top 10% of tokens, and its entropy over
    log(tokens), from the definitions with plain Python."""
    import math

    lo, hi = min(heat), max(heat)
    p = [(h - lo) / (hi - lo) for h in heat]
    k = math.ceil(0.1 * len(p))
    total = sum(p)
    share = sum(sorted(p, reverse=True)[:k]) / total
    entropy = -sum(x / total * math.log(x / total) for x in p if x > 0) / math.log(len(p))
    return share, entropy


@pytest.mark.integration
def test_report_concentration_and_agreement_match_scipy_and_hand_computation(run_output, tmp_path):
    from scipy.stats import spearmanr

    r = run_cli("report", str(run_output), "--samples", "0", "--out", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    rows = [r for r in pq.read_table(run_output / "heatmaps").to_pylist() if r["status"] == "ok"]
    maps = {(r["image_id"], r["method"]): r["heatmap"] for r in rows}
    ids = sorted({i for i, _ in maps})
    stats = {(m, k): (v, n) for m, k, v, n in _cells(page, "stat")}
    for method in ("attention", "gae", "lnstd"):
        by_hand = np.array([_by_hand_concentration(maps[(i, method)]) for i in ids])
        assert stats[(method, "top_share")] == (pytest.approx(by_hand[:, 0].mean(), rel=1e-6), 29)
        assert stats[(method, "entropy")] == (pytest.approx(by_hand[:, 1].mean(), rel=1e-6), 29)
    cells = re.findall(r"data-a='([^']+)' data-b='([^']+)' data-rho='([^']+)' data-n='(\d+)'", page)
    assert len(cells) == 9
    for a, b, rho, n in cells:
        per_image = [spearmanr(maps[(i, a)], maps[(i, b)]).statistic for i in ids]  # average ranks
        assert float(rho) == pytest.approx(np.mean(per_image), abs=1e-9) and int(n) == 29
        if a == b:
            assert float(rho) == pytest.approx(1.0)


def test_concentration_of_known_maps():
    from lnstd.report import agreement, concentration

    flat_but_one = np.r_[np.zeros(99), 1.0]  # one token holds everything
    ramp = np.arange(100.0)  # scaled to k/99: the top 10 tokens hold (90+...+99)/4950
    share, entropy = concentration(np.stack([flat_but_one, ramp]))
    assert share[0] == pytest.approx(1.0) and entropy[0] == pytest.approx(0.0)
    assert share[1] == pytest.approx(sum(range(90, 100)) / 4950)
    assert np.isnan(concentration(np.ones((1, 10)))[0][0])  # a constant map has no shape
    # ties share their average rank: [1, 1, 2] and [0, 0, 5] rank the same way
    rho, n = agreement({"a": np.array([[1.0, 1.0, 2.0]]), "b": np.array([[0.0, 0.0, 5.0]]),
                        "c": np.array([[2.0, 2.0, 1.0]])})  # fmt: skip
    assert rho[0, 1] == pytest.approx(1.0) and rho[0, 2] == pytest.approx(-1.0) and n[0, 1] == 1


@pytest.mark.integration
def test_report_of_a_read_only_output_writes_nothing_into_it(run_output, tmp_path):
    """``lnstd report OUTPUT --out elsewhere`` reads only: every file of the output keeps its name,
    size and modification time (checked, not assumed: as root, a read-only folder stops nothing)."""
    import os
    import stat

    def listing() -> dict[str, tuple[int, int]]:
        return {
            p.relative_to(run_output).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_output.rglob("*"))
        }

    before = listing()
    modes = {p: p.stat().st_mode for p in [run_output, *run_output.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        r = run_cli("report", str(run_output), "--samples", "3", "--out", str(tmp_path / "elsewhere.html"))
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "elsewhere.html").stat().st_size > 10_000
    assert listing() == before


@pytest.mark.integration
def test_report_renders_in_chromium_without_network_or_errors(run_output, tmp_path):
    html = run_output / "_report.html"
    shot = tmp_path / "report.png"
    seen = visit(html, shot, width=1280)
    assert seen.requests == [html.resolve().as_uri()], "the page asked for something besides itself"
    assert seen.console_errors == [] and seen.page_errors == []
    assert seen.scroll_width <= seen.viewport_width == 1280, "the page overflows sideways at 1280 px"
    assert seen.images == 12 * (1 + 3)  # 12 gallery rows (default --samples), the image + 3 methods
    page = html.read_text()
    where_rows = page.count("<tr data-class=")
    where_gallery = page.count("<tr data-image=")
    assert where_rows > 0 and where_gallery > 0
    assert seen.where_images == where_rows + 2 * where_gallery  # a mean map each; image + map each
    assert seen.broken_images == []
    assert seen.banner is None  # a checkpoint was loaded
    assert seen.agreement_cells == 9
    img = Image.open(shot)
    assert img.size[0] == 1280 and img.size[1] > 1500
    assert len(set(img.convert("L").resize((64, 64)).getdata())) > 20  # a page with content, not blank
    # the masks are outlined in the gallery: the contour's green is in the pictures, not in the page's
    # own colours
    green = np.all(np.abs(np.asarray(img.convert("RGB"), np.int16) - [0, 255, 128]) < 40, axis=-1)
    assert green.sum() > 2000


@pytest.mark.integration
def test_where_the_model_looks_section_is_the_aggregates_figures(run_output, tmp_path):
    """The report's "Where the model looks" table holds lnstd's per-class figures as ``lnstd aggregate``
    writes them to _aggregate/where_classes.csv, ranked by the share on the border; the demo has
    labels and masks, so classes are true classes and the object's share is shown."""
    import pyarrow.csv as pacsv

    r = run_cli("report", str(run_output), "--samples", "3", "--out", str(tmp_path / "w.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "w.html").read_text()
    assert run_cli("aggregate", str(run_output)).returncode == 0
    csv = pacsv.read_csv(run_output / "_aggregate" / "where_classes.csv").to_pylist()
    mine = {r["class"]: r for r in csv if r["method"] == "lnstd" and r["kind"] == "label"}
    cell = r"<tr data-class='(\d+)'><td[^>]*>[^<]*</td><td>\d+</td><td data-border='([^']+)'"
    shown = [(int(c), float(b)) for c, b in re.findall(cell, page)]
    assert len(shown) == min(len(mine), 12) > 0
    assert [b for _, b in shown] == sorted((b for _, b in shown), reverse=True)
    for cls, b in shown:
        assert b == pytest.approx(mine[cls]["border_share"], abs=1e-6)
    assert "<th>in the object</th>" in page and "farthest from their class" in page
    assert (run_output / "_aggregate" / "where" / "part-00000.csv").exists()


@pytest.fixture(scope="module")
def photos_output(tmp_path_factory) -> Path:
    """A user's own photos: no labels, no masks, two broken files, a model with random weights."""
    from .jobhelpers import TINY_ARGS, TINY_MODEL, good_image

    tmp = tmp_path_factory.mktemp("photos")
    (tmp / "photos").mkdir()
    for k in range(8):
        (tmp / "photos" / f"p{k}.jpg").write_bytes(good_image(2 * k))
    (tmp / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp / "photos" / "half.png").write_bytes(good_image(1)[:40])
    flags = [f for k, v in TINY_ARGS.items() for f in ("--model-arg", f"{k}={v}")]
    r = run_cli("run", "--input", str(tmp / "photos"), "--output", str(tmp / "out"), "--model",
                TINY_MODEL, *flags, "--methods", "gae,lnstd,rollout", "--no-progress",
                "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lnstd: warning: random weights" in r.stderr  # said in the run's own output too
    return tmp / "out"


@pytest.mark.integration
def test_report_of_unlabelled_photos_with_random_weights_in_chromium(photos_output, tmp_path):
    html = photos_output / "_report.html"
    seen = visit(html, tmp_path / "photos.png", width=1280)
    assert seen.requests == [html.resolve().as_uri()] and seen.console_errors == [] and seen.page_errors == []
    assert seen.scroll_width <= seen.viewport_width == 1280, "the page overflows sideways at 1280 px"
    page = html.read_text()
    assert seen.banner and "random weights" in seen.banner
    assert seen.agreement_cells == 9  # 3 x 3 methods
    assert "no labels" in page and "no masks, so no mask metrics" in page and "outlined" not in page
    for name in ("broken.jpg", "half.png"):
        assert str(photos_output.parent / "photos" / name) in page
    # per-image values appear once: one probability histogram, none per method
    assert page.count("probability of the explained class</h3>") == 1 and "gae (n=" not in page
    assert seen.images == 8 * (1 + 3)  # every explained photo (fewer than --samples), image + 3 methods
    assert seen.broken_images == []


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
        i = t.schema.get_field_index("deletion_curve")
        pq.write_table(t.set_column(i, "deletion_curve", pa.array(curves, pa.list_(pa.float32()))), part)
    r = run_cli("report", str(out), "--samples", "3")
    assert r.returncode == 0, r.stderr
    page = (out / "_report.html").read_text()
    assert "Perturbation curves" in page and "aria-label='deletion_curve'" in page
    assert page.count("<polyline fill=") == 3  # one line per method (the gallery's own have data-curve)
    assert "aria-label='insertion_curve'" not in page  # a column no row holds is not plotted


def test_mask_contour_width():
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    arr = np.asarray(contour(img, mask, width=2))
    green = np.all(arr == [0, 255, 128], axis=-1)
    assert green.sum() == 20 * 20 - 16 * 16  # a 2-pixel ring inside the 20 x 20 square
    assert green[10, 10] and green[11, 11] and not green[12, 12] and not green[9, 9]


@pytest.fixture(scope="module")
def all_methods_output(tmp_path_factory) -> Path:
    """The committed toy ViT (its JSON names the classes), every method, one batch of 12 images."""
    from lnstd.train import toy_checkpoint

    tmp = tmp_path_factory.mktemp("all-methods")
    manifest = write_dataset(str(tmp / "data"), n=12, size=64, seed=3)
    ckpt = str(toy_checkpoint("vit"))
    r = run_cli("run", "--input", manifest, "--output", str(tmp / "out"), "--checkpoint", ckpt,
                "--methods", "all", "--no-progress", "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "out"


@pytest.mark.integration
@pytest.mark.parametrize("width", [390, 1920])
def test_report_is_readable_from_a_phone_to_a_wide_screen(all_methods_output, tmp_path, width):
    html = all_methods_output / "_report.html"
    seen = visit(html, tmp_path / f"report_{width}.png", width=width)
    assert seen.viewport_width == width and seen.scroll_width <= width, "the page overflows sideways"
    assert seen.broken_words == [], "words or numbers split over two lines"
    assert seen.overflowing == [], "elements narrower than their own label"
    assert seen.agreement_cells == 7 * 7  # every method, the labels among the checked elements
    assert len(seen.thumb_widths) == 12 * 8 and min(seen.thumb_widths) >= 96


@pytest.mark.integration
def test_report_has_legends_class_names_and_no_empty_spread(all_methods_output):
    import json

    from lnstd.train import toy_checkpoint
    from lnstd.viz import colorize

    page = (all_methods_output / "_report.html").read_text()
    assert "name='viewport' content='width=device-width" in page
    for ident in ("legend-heatmap", "legend-agreement"):
        bar = re.search(rf"id='{ident}'.*?linear-gradient\(to right, (.*?)\)'", page).group(1)
        lo, hi = (f"rgb({r},{g},{b})" for r, g, b in colorize(np.array([0.0, 1.0])))
        assert bar.startswith(f"{lo} 0%") and bar.endswith(f"{hi} 100%"), bar
    classes = json.loads(toy_checkpoint("vit").with_suffix(".json").read_text())["classes"]
    predicted = re.search(r"most predicted classes \(images\)</td><td[^>]*>([^<]*)<", page).group(1)
    assert any(f"{name} ({k})" in predicted for k, name in enumerate(classes)), predicted
    assert not re.search(r"± 0\.0+ \(", page) and not re.search(r"-0\.0+\b", page)
    times = re.findall(r"data-metric='elapsed_ms'[^>]*>([^<]*)<", page)
    assert len(times) == 7 and all(t.endswith("(12, one batch)") for t in times), times  # 12 < --batch-size
