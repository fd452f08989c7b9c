"""lnstd.ray.Attributor in Ray Data pipelines on the local Ray cluster (in a subprocess): its rows equal
``lnstd run``'s for the same images, bad images included, and the README's pipeline runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lnstd

from .jobhelpers import (
    ROOT,
    TINY_ARGS,
    TINY_MODEL,
    bad_files,
    good_image,
    model_flags,
    run_cli,
    tiny_checkpoint,
)

pytestmark = pytest.mark.integration  # Ray in a subprocess

METHODS = ["gae", "gradcam", "attnlrp"]
FAITHFUL = ["deletion", "road"]  # the pipeline's and the job's --faithfulness

PIPELINE = """
import json, sys
import ray
from ray.data import ActorPoolStrategy
from lnstd.ray import Attributor

folder, out, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(address="local", num_cpus=4, include_dashboard=False)
ds = ray.data.read_binary_files(folder, include_paths=True)
rows = ds.map_batches(Attributor, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=2),
                      num_cpus=0.5, batch_size=6)
rows.write_parquet(out)
"""
SIZES = [(40, 30), (30, 50), (64, 64), (90, 20)]  # the README pipeline's pictures (PNG)


def _python(code: str, *args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env_code = "import os; os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')\n" + code
    return subprocess.run([sys.executable, "-c", env_code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Path:
    """One Ray session running both pipelines: the README's (read_images) over ``images/``, and one
    over the bytes of 18 good and 2 broken pictures in ``in/``."""
    tmp_path = tmp_path_factory.mktemp("ray_data")
    ckpt = tiny_checkpoint(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(18):
        (folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}").write_bytes(good_image(i))
    bad = bad_files()
    for name in ("bad/truncated.jpg", "bad/text.png"):
        (folder / Path(name).name).write_bytes(bad[name])
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
    kwargs = {"model": TINY_MODEL, "checkpoint": str(ckpt), "model_args": TINY_ARGS, "methods": METHODS,
              "column": "bytes", "faithfulness": FAITHFUL}  # fmt: skip
    r = _python(PIPELINE, str(folder), str(tmp_path / "rows"), json.dumps(kwargs), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path


@pytest.fixture(scope="module")
def readme_run(pipelines) -> subprocess.CompletedProcess:
    """The README's pipeline, its exact code, on a local Ray of 2 CPUs (this machine's size): it
    must finish (a pool that takes every CPU leaves the read task waiting for ever)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## In a Ray Data pipeline\n\n```python\n(.*?)```", readme, re.S).group(1)
    two_cpus = 'import ray\nray.init(address="local", num_cpus=2, include_dashboard=False)\n'
    return _python(two_cpus + code, cwd=pipelines, timeout=240)


def test_pipeline_rows_equal_the_jobs_rows_bad_images_included(pipelines):
    tmp_path, folder = pipelines, pipelines / "in"
    ckpt = tiny_checkpoint(tmp_path)
    job = run_cli("run", "--input", str(folder), "--output", str(tmp_path / "job"), *model_flags(ckpt),
                  "--methods", ",".join(METHODS), "--faithfulness", ",".join(FAITHFUL), "--no-progress",
                  "--cpus-per-actor", "0.5")  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]

    ours = pq.read_table(tmp_path / "rows").to_pylist()
    theirs = {(r["source"], r["method"]): r for r in pq.read_table(tmp_path / "job" / "heatmaps").to_pylist()}
    for m in METHODS:
        rows = [r for r in ours if r["method"] == m]
        assert len(rows) == 20, m
        assert sorted(r["source"] for r in rows if r["status"] == "error") == sorted(
            str(folder / n) for n in ("truncated.jpg", "text.png")
        )
    assert {(r["source"], r["method"]) for r in ours} == set(theirs)
    for row in ours:
        want = theirs[(row["source"], row["method"])]
        for col in (
            "status",
            "error",
            "width",
            "height",
            "crop_box",
            "target",
            "predicted",
            "grid_h",
            "model",
        ):
            assert row[col] == want[col], (col, row["source"])
        assert row["shard"] == -1
        if row["status"] == "ok":
            assert row["probability"] == pytest.approx(want["probability"], rel=1e-5)
            a, b = np.asarray(row["heatmap"]), np.asarray(want["heatmap"])
            assert np.abs(a - b).max() <= 1e-5 * (b.max() - b.min()), (row["source"], row["method"])
            for col in ("deletion_auc", "road_morf", "road_lerf", "deletion_curve", "road_morf_curve"):
                np.testing.assert_allclose(row[col], want[col], atol=1e-4, err_msg=col)
            assert row["insertion_auc"] is None and row["insertion_curve"] is None  # not asked for
        else:
            assert row["deletion_auc"] is None and row["road_morf_curve"] is None


@pytest.mark.timeout(400)
def test_readme_pipeline_runs_as_written_on_two_cpus(pipelines, readme_run):
    assert readme_run.returncode == 0, readme_run.stderr[-3000:]
    # the replicas had random weights, and said so (Ray shows the actors' warnings)
    assert "RandomWeightsWarning" in readme_run.stderr + readme_run.stdout
    tmp_path, sizes = pipelines, SIZES
    rows = pq.read_table(tmp_path / "saliency-rows").to_pylist()
    assert len(rows) == len(sizes) * 2 and {r["status"] for r in rows} == {"ok"}
    # the same rows from the library on the same pictures (the replicas' seed-0 random weights)
    torch.manual_seed(0)
    model = lnstd.load_model("vit_tiny_patch16_224")
    to_tensor = lnstd.transform_for(model)
    explainer = lnstd.Explainer(model, ["lnstd", "gradcam"])
    for source in {row["source"] for row in rows}:
        x = to_tensor(Image.open(tmp_path / source).convert("RGB"))[None]  # as Ray Data names it
        want = explainer(x).heatmaps
        for row in (r for r in rows if r["source"] == source):
            w, got = want[row["method"]][0].flatten().numpy(), np.asarray(row["heatmap"])
            assert np.abs(got - w).max() <= 1e-5 * (w.max() - w.min()), (source, row["method"])
            assert (row["width"], row["height"]) in sizes
