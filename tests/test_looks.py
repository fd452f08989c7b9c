"""Where the model looks (lnstd/looks.py, in ``lnstd aggregate`` and the report): every figure against
NumPy over all rows at once, on an output built so that the answer is known: one class whose maps sit
in a corner, three images whose maps look where their class never does, misclassified images."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from lnstd import looks
from lnstd import output as layout
from lnstd.aggregate import aggregate, describe

G = looks.GRID


@pytest.mark.parametrize("n_in", [4, 7, 14, 16, 32])
def test_resize_is_torchs_bilinear_up_and_area_down(n_in):
    x = np.random.default_rng(n_in).random((2, n_in, n_in))
    got = looks.resize_matrix(n_in, G) @ x @ looks.resize_matrix(n_in, G).T
    mode = {"mode": "bilinear", "align_corners": False} if n_in <= G else {"mode": "area"}
    want = F.interpolate(torch.tensor(x)[:, None], size=(G, G), **mode)[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def _output(out, seed: int = 0):
    """Two methods x 200 images (classes 0..4) on the common grid itself (16 x 16, so no resizing);
    class 3 looks at the top-left corner; images 0, 5, 10 (class 0) at the centre, which no other
    class-0 image does; images 1 and 6 misclassified as class 2; every 9th image an error row; a
    mask figure on every row; one ok row whose map is NaN. Returns the ok rows with finite maps."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(layout.row_fields(pa.list_(pa.float32(), G * G)))
    rows = []
    for i in range(200):
        cls = i % 5
        predicted = 2 if i in (1, 6) else cls
        bad = i % 9 == 4
        for method in ("gae", "lnstd"):
            heat = rng.random((G, G)) * 0.2
            if cls == 3:
                heat[:3, :3] += 3
            elif i in (0, 5, 10):
                heat[6:10, 6:10] += 5
            else:
                heat[4:12, 4:12] += rng.random((8, 8))
            rows.append({"image_id": f"i{i}", "source": f"/d/i{i}.png", "method": method, "model": "m",
                         "label": cls, "target": predicted, "predicted": predicted, "shard": 0,
                         "status": "error" if bad else "ok", "error": "corrupt" if bad else None,
                         "heatmap": None if bad else heat.ravel().astype(np.float32).tolist(),
                         "grid_h": None if bad else G, "grid_w": None if bad else G,
                         "mass_in_mask": None if bad else float(rng.random())})  # fmt: skip
    rows[2 * 7]["heatmap"] = [float("nan")] * (G * G)  # one ok map with a bad value: counts nowhere
    (out / "heatmaps").mkdir(parents=True)
    for part in range(2):  # two parts: two per-image files
        table = pa.Table.from_pylist(rows[part * 200 : (part + 1) * 200], schema=schema)
        counts = {"images": 100, "ok": 0, "errors": 0}
        table = table.replace_schema_metadata({layout.SHARD_COUNTS: json.dumps(counts).encode()})
        pq.write_table(table, out / "heatmaps" / layout.part_name(part), row_group_size=37)
    return [r for r in rows if r["status"] == "ok" and np.isfinite(r["heatmap"]).all()]


def _numpy_figures(ok):
    """Each row's distribution, border share and class memberships, computed directly."""
    ring = np.ones((G, G), bool)
    ring[1:-1, 1:-1] = False
    p = {}
    for r in ok:
        m = np.asarray(r["heatmap"], np.float64)
        m = (m - m.min()) / (m.max() - m.min())
        p[(r["image_id"], r["method"])] = m / m.sum()
    border = {k: float(v.reshape(G, G)[ring].sum()) for k, v in p.items()}
    return p, border


def test_classes_and_images_equal_numpy_and_duckdb_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(looks, "BATCH_ROWS", 50)  # several batches per part: the figures must not care
    ok = _output(tmp_path / "out")
    result = aggregate(str(tmp_path / "out"))
    p, border = _numpy_figures(ok)
    classes = {(r["method"], r["kind"], r["class"]): r for r in result["where"].classes.to_pylist()}
    member = {
        "predicted": lambda r: r["predicted"],
        "label": lambda r: r["label"] if r["target"] == r["label"] else None,
    }
    means = {}
    for (method, kind, cls), got in classes.items():
        mine = [r for r in ok if r["method"] == method and member[kind](r) == cls]
        mean = np.mean([p[(r["image_id"], method)] for r in mine], axis=0)
        mean /= mean.sum()
        means[(method, kind, cls)] = mean
        dist = [0.5 * np.abs(p[(r["image_id"], method)] - mean).sum() for r in mine]
        assert got["images"] == len(mine) > 0
        assert got["border_share"] == pytest.approx(np.mean([border[(r["image_id"], method)] for r in mine]))
        assert got["in_mask"] == pytest.approx(np.mean([r["mass_in_mask"] for r in mine]))
        assert got["distance"] == pytest.approx(np.mean(dist))
        np.testing.assert_allclose([float(v) for v in got["map"].split(";")], mean, atol=1e-5)
    # 5 predicted classes and 5 true ones per method; the misclassified images count only as predicted
    assert len(classes) == 2 * 2 * 5
    # images 1 and 6 (class 1, predicted 2) count for predicted class 2 only
    assert classes[("gae", "label", 1)]["images"] == classes[("gae", "predicted", 1)]["images"]
    assert classes[("gae", "predicted", 2)]["images"] == classes[("gae", "label", 2)]["images"] + 2
    for method in ("gae", "lnstd"):
        ranked = sorted((r for k, r in classes.items() if k[:2] == (method, "predicted")),
                        key=lambda r: -r["border_share"])  # fmt: skip
        assert ranked[0]["class"] == 3 and ranked[0]["border_share"] > 1.5 * looks.RING_AREA
        # the three images that look where class 0 never does are its farthest
        far = result["where"].far[method]
        assert {i for _, i, _ in far[:3]} == {"i0", "i5", "i10"} and all(c == 0 for _, _, c in far[:3])
        # the maps with the most relevance on the border are those of the corner-looking class
        top_border = result["where"].border[method]
        assert len(top_border) == 10 and {c for _, _, c in top_border} == {3}
        mine = sorted((border[(r["image_id"], method)] for r in ok if r["method"] == method), reverse=True)
        assert [v for v, _, _ in top_border] == pytest.approx(mine[:10])
        worst = min(ok, key=lambda r: r["mass_in_mask"] if r["method"] == method else 2)
        assert result["where"].off[method][0][1] == worst["image_id"]
    # the per-image files: one row per ok row, its own figures; DuckDB reads the folder as one table
    folder = tmp_path / "out" / "_aggregate" / "where"
    assert sorted(f.name for f in folder.iterdir()) == ["part-00000.csv", "part-00001.csv"]
    table = duckdb.sql(f"select * from read_csv('{folder}/*.csv') order by image_id, method").fetchall()
    cols = [d[0] for d in duckdb.sql(f"select * from read_csv('{folder}/*.csv') limit 0").description]
    got = {
        (r[cols.index("image_id")], r[cols.index("method")]): dict(zip(cols, r, strict=True)) for r in table
    }
    assert len(got) == len(ok)
    for r in ok:
        row = got[(r["image_id"], r["method"])]
        kind = "predicted"  # every row explains its prediction here
        assert (row["kind"], row["class"]) == (kind, r["predicted"])
        assert row["border_share"] == pytest.approx(border[(r["image_id"], r["method"])])
        assert row["in_mask"] == pytest.approx(r["mass_in_mask"])
        mean = means[(r["method"], kind, r["predicted"])]
        assert row["distance"] == pytest.approx(0.5 * np.abs(p[(r["image_id"], r["method"])] - mean).sum())
    text = describe(result)
    assert (
        "gae: most on the border, true class 3: " in text
        and "lnstd: most on the border, true class 3" in text
    )
    classes_csv = duckdb.sql(f"select count(*) from read_csv('{tmp_path}/out/_aggregate/where_classes.csv')")
    assert classes_csv.fetchall()[0][0] == len(classes)


def test_a_uniform_map_puts_the_ring_area_on_the_border_and_grids_are_resized():
    """A constant map is uniform whatever its grid; a map hot in one corner token puts more than the
    ring's area on the border; a 4 x 4 map upsampled keeps its sum (a distribution)."""
    for gh, gw in ((4, 4), (14, 14), (7, 9), (28, 28)):
        flat = looks.common_grid(np.full((1, gh * gw), 3.0), gh, gw)
        np.testing.assert_allclose(flat, 1 / G**2)
        corner = np.zeros((gh, gw))
        corner[0, 0] = 1
        p = looks.common_grid(corner.reshape(1, -1), gh, gw).reshape(G, G)
        assert p.sum() == pytest.approx(1) and p.min() >= 0
        ring = np.ones((G, G), bool)
        ring[1:-1, 1:-1] = False
        assert p[ring].sum() > looks.RING_AREA


def test_no_where_leaves_it_out(tmp_path):
    _output(tmp_path / "out")
    result = aggregate(str(tmp_path / "out"), where=False)
    assert result["where"] is None and "where the model looks" not in describe(result)
    assert sorted(p.name for p in (tmp_path / "out" / "_aggregate").iterdir()) == [
        "counts.json",
        "per_class.csv",
        "summary.csv",
    ]


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_a_run_of_the_shortcut_model_finds_its_watermark(tmp_path):
    """The committed planted-shortcut ViT partly relies on a corner watermark that co-occurs with class
    ``plus`` (its record: ``plus`` recognised 100% with the watermark, 86% without). A run over fresh
    planted-shortcut images (the mask is the marker's box) and ``lnstd aggregate`` show it without
    anyone looking at a map, by gae:
    - ``plus`` is the class whose maps put the most relevance on the border (the issue's test);
    - of the 10 ``plus`` maps with the least relevance in the marker, at least 8 carry the watermark
      (the issue's test; weak alone: 85% of ``plus`` images carry it);
    - of the 10 maps of any class with the most relevance on the border, at least 5 carry it, where
      22% of the images do (the report's "most relevance on the border" gallery)."""
    import pyarrow.csv as pacsv

    from lnstd.data.planted import PLANTED_CLASSES, SHORTCUT_CLASS, planted_batch
    from lnstd.data.toy import write_dataset
    from lnstd.train import toy_checkpoint
    from tests.jobhelpers import run_cli

    b = planted_batch(160, seed=30_000, shortcut=True)  # a split no model trained or was tested on
    manifest = write_dataset(str(tmp_path / "in"), b.images, b.masks, b.labels)
    out = tmp_path / "out"
    r = run_cli("run", "--input", manifest, "--output", str(out), "--checkpoint",
                str(toy_checkpoint("vit", "planted-shortcut")), "--methods", "gae", "--no-progress",
                "--no-report", "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    agg = run_cli("aggregate", str(out))
    assert agg.returncode == 0, agg.stderr
    classes = [c for c in pacsv.read_csv(out / "_aggregate" / "where_classes.csv").to_pylist()
               if c["method"] == "gae" and c["kind"] == "label"]  # fmt: skip
    ranked = sorted(classes, key=lambda c: -c["border_share"])
    assert ranked[0]["class"] == SHORTCUT_CLASS, [
        (PLANTED_CLASSES[c["class"]], c["border_share"]) for c in ranked
    ]

    def marked(query: str) -> list[bool]:
        rows = duckdb.sql(f"select image_id from read_csv('{out}/_aggregate/where/*.csv') {query} limit 10")
        return [bool(b.watermark[int(i.rsplit("/", 1)[-1][:4])]) for (i,) in rows.fetchall()]

    assert b.watermark.mean() < 0.25
    assert sum(marked(f"where class = {SHORTCUT_CLASS} order by in_mask")) >= 8
    assert sum(marked("order by border_share desc")) >= 5
