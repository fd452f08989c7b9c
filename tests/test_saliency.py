"""Reading a saliency dataset back: arrays, maps over the original pixels (checked against the PNGs
``lnstd run --save-png`` writes), and the Dataset joined with its images."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lnstd

from .jobhelpers import good_image, model_flags, read_rows, run_cli, tiny_checkpoint

pytestmark = pytest.mark.integration  # the CLI in a subprocess (Ray)

SIZES = [(45, 23), (23, 61), (40, 40)]  # wide, tall, square


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """One --save-png run per fit over the same non-square images."""
    root = tmp_path_factory.mktemp("saliency")
    ckpt = tiny_checkpoint(root)
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "in" / f"{i}.png")
    (root / "in" / "broken.png").write_bytes(good_image(1)[:40])
    out = {}
    for fit in ("resize", "center-crop"):
        r = run_cli("run", "--input", str(root / "in"), "--output", str(root / fit), *model_flags(ckpt),
                    "--methods", "gae,gradcam", "--fit", fit, "--save-png", "--no-progress",
                    "--cpus-per-actor", "0.5")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        out[fit] = root / fit
    return out


@pytest.mark.parametrize("fit", ["resize", "center-crop"])
def test_to_pixels_equals_the_saved_png(runs, fit):
    rows = [r for r in read_rows(runs[fit]) if r["status"] == "ok"]
    assert len(rows) == len(SIZES) * 2
    seen = set()
    for row in rows:
        png = np.asarray(Image.open(io.BytesIO(row["heatmap_png"])))
        m = lnstd.to_pixels(row)
        assert m.shape == (row["height"], row["width"]) == png.shape[:2]
        seen.add(m.shape)
        inside = ~np.isnan(m)
        np.testing.assert_array_equal(png[..., 1], inside * 255)
        np.testing.assert_array_equal(png[..., 0][inside], np.round(m[inside] * 255))
        if fit == "center-crop" and row["width"] != row["height"]:
            assert not inside.all()  # the crop left part of the picture out
        # a smaller copy of the picture: same box, scaled
        half = lnstd.to_pixels(row, size=(row["width"] // 2, row["height"] // 2))
        assert half.shape == (row["height"] // 2, row["width"] // 2)
    assert seen == {(h, w) for w, h in SIZES}


def test_read_heatmaps_pushes_filters_down_and_gives_arrays(runs, tmp_path):
    out = runs["resize"]
    table = pq.read_table(out)
    hm = lnstd.read_heatmaps(str(out), filters=[("method", "=", "gae")])
    want = [r for r in table.to_pylist() if r["status"] == "ok" and r["method"] == "gae"]
    assert isinstance(hm.maps, np.ndarray) and hm.maps.shape == (len(want), 4, 4) == (3, 4, 4)
    assert hm.rows["image_id"].to_pylist() == [r["image_id"] for r in want]
    for i, r in enumerate(want):
        np.testing.assert_array_equal(hm.maps[i].ravel(), np.float32(r["heatmap"]))
    assert "heatmap" not in hm.rows.schema.names and "heatmap_png" not in hm.rows.schema.names
    # the same from a table in memory, as torch, and the broken image's error row left out
    ht = lnstd.read_heatmaps(table, filters=[("method", "=", "gae")], tensor=True)
    assert isinstance(ht.maps, torch.Tensor) and torch.equal(ht.maps, torch.from_numpy(hm.maps))
    assert "broken.png" in table["image_id"].to_pylist()
    both = lnstd.read_heatmaps(table)
    assert len(both) == 6 and "broken.png" not in both.rows["image_id"].to_pylist()
    np.testing.assert_array_equal(lnstd.to_pixels(hm.row(0)), lnstd.to_pixels(want[0]))


def test_read_heatmaps_from_s3(runs, s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="sal")
    part = next((runs["resize"] / "heatmaps").glob("*.parquet"))
    client.put_object(Bucket="sal", Key=f"run/heatmaps/{part.name}", Body=part.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        hm = lnstd.read_heatmaps("s3://sal/run", [("method", "=", "gradcam")], s3_endpoint=s3_server.endpoint)
    local = lnstd.read_heatmaps(str(runs["resize"]), [("method", "=", "gradcam")])
    np.testing.assert_array_equal(hm.maps, local.maps)


def test_dataset_joins_maps_with_their_images(runs):
    to_array = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    ds = lnstd.SaliencyDataset(str(runs["center-crop"]), [("method", "=", "gradcam")], to_array, pixels=True)
    assert len(ds) == 3
    rows = ds.heatmaps.rows.to_pylist()
    for i in range(len(ds)):
        item = ds[i]
        src = np.asarray(Image.open(rows[i]["source"]).convert("RGB"))
        np.testing.assert_array_equal(item["image"].numpy(), src)
        assert item["pixels"].shape == src.shape[:2]
        assert item["heatmap"].shape == (4, 4) and item["target"] == rows[i]["target"]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=lambda b: b)))
    assert [b["index"] for b in batch] == [0, 1, 2]


def test_readme_reading_back_runs_as_written(runs, tmp_path, monkeypatch, capsys):
    import re
    import shutil

    from .jobhelpers import ROOT

    text = (ROOT / "README.md").read_text()
    title = "## Read it back: arrays, pixels, a Dataset"
    code = re.search(title + r"\n\n```python\n(.*?)```", text, re.S).group(1)
    shutil.copytree(runs["resize"], tmp_path / "saliency")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["hm"].maps.shape == (3, 4, 4)
    first = scope["hm"].rows.slice(0, 1).to_pylist()[0]
    assert scope["pixels"].shape == (first["height"], first["width"])
    assert scope["batch"]["image"].shape == (2, 3, 224, 224) and scope["batch"]["heatmap"].shape == (2, 4, 4)
