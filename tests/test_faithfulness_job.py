"""``lnstd run --faithfulness``: the real job (Ray, Parquet) on the committed toy ViT, its columns
against the library function on the same maps, error rows NULL, ``lnstd aggregate`` carrying them."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch

import lnstd
from lnstd.config import RunConfig
from lnstd.data.preprocess import Preprocess
from lnstd.data.toy import write_toy_dataset
from lnstd.errors import UsageError
from lnstd.metrics.registry import FAITHFULNESS_CURVES, FAITHFULNESS_METRICS
from tests.jobhelpers import cli_in_process, read_rows, run_cli

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

TOY = Path(lnstd.__file__).parent / "checkpoints" / "toy_vit.safetensors"


def test_run_writes_faithfulness_columns_and_aggregate_carries_them(tmp_path):
    manifest = write_toy_dataset(str(tmp_path / "in"), n=2, seed=5)
    (tmp_path / "in" / "images" / "bad.png").write_bytes(b"not an image")
    with open(manifest, "a") as f:
        f.write("images/bad.png,1,\n")
    out = tmp_path / "out"
    r = run_cli("run", "--input", manifest, "--output", str(out), "--checkpoint", str(TOY),
                "--methods", "gae,gradcam", "--faithfulness", "deletion,insertion,road", "--batch-size", "4",
                "--target", "label", "--no-progress", "--no-report", "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 3 * 2 and len({(r["image_id"], r["method"]) for r in rows}) == 6  # exactly once
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4
    for row in rows:
        for name in FAITHFULNESS_METRICS:
            if row["status"] == "ok":
                assert np.isfinite(row[name]) and (name == "road_gap" or 0 <= row[name] <= 1), (name, row)
            else:
                assert row[name] is None
        if row["status"] == "ok":
            assert row["road_gap"] == pytest.approx(row["road_lerf"] - row["road_morf"], abs=1e-6)
            # the curves behind the figures: 11 steps of 10% (trapezoid area = the AUC), 9 percentiles
            for kind in ("deletion", "insertion"):
                curve = row[f"{kind}_curve"]
                whole = curve[0] if kind == "deletion" else curve[-1]  # nothing deleted, all inserted
                assert len(curve) == 11 and whole == pytest.approx(row["probability"], abs=1e-4)
                assert row[f"{kind}_auc"] == pytest.approx(
                    np.trapezoid(curve, np.linspace(0, 1, 11)), abs=1e-6
                )
            for kind in ("road_morf", "road_lerf"):
                assert len(row[f"{kind}_curve"]) == 9
                assert row[kind] == pytest.approx(np.mean(row[f"{kind}_curve"]), abs=1e-6)
        else:
            assert all(row[name] is None for name in FAITHFULNESS_CURVES)
    # the columns are the library function's figures of the maps the row holds
    model = lnstd.load_model(None, checkpoint=TOY)
    prep = Preprocess.for_model(model, "resize")
    for row in ok[:2]:  # each alone, not in its batch: the figures must not depend on the batch
        img, geom = prep.decode(Path(row["source"]).read_bytes())
        x = prep.tensor(img, geom)[None]
        heat = torch.tensor(row["heatmap"]).view(1, row["grid_h"], row["grid_w"])
        want = lnstd.faithfulness(model, x, heat, torch.tensor([row["target"]]), curves=True)
        for name in FAITHFULNESS_METRICS:
            assert row[name] == pytest.approx(float(want[name][0]), abs=1e-4), name
        for name in FAITHFULNESS_CURVES:
            np.testing.assert_allclose(row[name], want[name][0].numpy(), atol=1e-4, err_msg=name)
    ident = json.loads((out / "_lnstd" / "run.json").read_text())["identity"]
    assert ident["faithfulness"] == ["deletion", "insertion", "road"]
    page = tmp_path / "r.html"
    rep = run_cli("report", str(out), "--out", str(page))
    assert rep.returncode == 0, rep.stderr
    text = page.read_text()
    assert "Which map to believe" in text and "On these 2 images, " in text
    for name in FAITHFULNESS_METRICS:
        assert text.count(f"data-metric='{name}' data-method=") == 2  # both methods ranked
    # the gallery draws each map's curves: its points are the row's values (y = 1 - p, in 0..100)
    assert "id='legend-faithfulness'" in text
    for row in ok:
        svg = re.search(
            f"<svg class='faith'[^>]*data-image='{re.escape(html.escape(row['image_id']))}' "
            f"data-method='{row['method']}'.*?</svg>", text, re.S,
        ).group(0)  # fmt: skip
        for name in FAITHFULNESS_CURVES:
            points = re.search(f"data-curve='{name}'[^>]*points='([^']*)'", svg).group(1).split()
            drawn = [1 - float(p.split(",")[1]) / 100 for p in points]
            np.testing.assert_allclose(drawn, row[name], atol=1e-4, err_msg=name)
    agg = run_cli("aggregate", str(out))
    assert agg.returncode == 0, agg.stderr
    summary = pacsv.read_csv(out / "_aggregate" / "summary.csv").to_pylist()
    for method in ("gae", "gradcam"):
        for name in FAITHFULNESS_METRICS:
            values = [r[name] for r in ok if r["method"] == method]
            s = next(s for s in summary if s["method"] == method and s["metric"] == name)
            assert s["count"] == 2 and s["mean"] == pytest.approx(np.mean(values), rel=1e-5)


def test_off_by_default_and_identity_unchanged(tmp_path):
    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m", methods=["gae"])
    assert cfg.faithfulness == [] and "faithfulness" not in cfg.identity()
    on = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m", methods=["gae"],
                   faithfulness=["road", "deletion"])  # fmt: skip
    assert on.identity()["faithfulness"] == ["deletion", "road"]
    with pytest.raises(UsageError, match="--faithfulness takes deletion, insertion, road, got pixelflip"):
        RunConfig(input="a", output="b", model="m", methods=[], faithfulness=["pixelflip"])


def test_ranking_known_answer():
    """A beats B by 0.2 on every image; C equals A up to noise far below the spread: A first, B
    distinguishable from it, C not; intervals cover the means; lower-is-better reverses the order."""
    from lnstd.ranking import rank_methods, ranking_section

    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, 300)
    values = {"B": a - 0.2, "A": a, "C": a + rng.normal(0, 1e-4, 300)}
    places = rank_methods(values, higher=True)
    assert [p.method for p in places][2] == "B" and {places[0].method, places[1].method} == {"A", "C"}
    b = places[2]
    assert b.distinguishable and b.diff == pytest.approx(-0.2, abs=1e-3) and b.diff_high < 0
    assert not places[1].distinguishable
    for p in places:
        assert p.low < p.mean < p.high and p.mean == pytest.approx(np.mean(values[p.method]))
    assert rank_methods(values, higher=False)[0].method == "B"
    rows = [{"image_id": str(i), "target": 0, "method": m, "road_gap": float(v[i])}
            for m, v in values.items() for i in range(300)]  # fmt: skip
    html = ranking_section(rows, ["A", "B", "C"])
    assert "On these 300 images, " in html and "by road_gap" in html
    assert "not distinguishable from it" in html and "(not distinguishable)" in html
    assert ranking_section([{**r, "road_gap": None} for r in rows], ["A", "B", "C"]) == ""


def test_wrong_flag_is_named_and_help_states_the_cost(tmp_path, capsys):
    from lnstd.metrics.faithfulness import forwards_per_image

    (tmp_path / "in").mkdir()
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--model", "m"]
    code, err = cli_in_process("run", *args, "--faithfulness", "deletion,flip")
    assert code == 2 and "--faithfulness takes deletion, insertion, road, got flip" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        from lnstd.cli import main

        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    alone, both = forwards_per_image(["deletion"]), forwards_per_image(["deletion", "insertion"])
    road, every = forwards_per_image(["road"]), forwards_per_image(["deletion", "insertion", "road"])
    assert f"deletion or insertion alone {alone} model forwards, both {both}, road {road}" in text
    assert f"all three {every}," in text
