"""The job on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``: one head and worker
nodes, each a raylet of its own with its own resources): actors on every node, a node that joins
mid-run gets work, a node whose raylet is killed mid-run loses nothing, every input exactly once."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .jobhelpers import ROOT, good_image, read_rows

pytestmark = pytest.mark.integration

# Fast failure detection: a node whose raylet is killed is declared dead within about 2 s.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}  # fmt: skip


def _parts(out: Path) -> list[Path]:
    return sorted((out / "heatmaps").glob("part-*.parquet")) if (out / "heatmaps").exists() else []


def _node_of(part: Path) -> str:
    return pq.read_metadata(part).metadata[b"lnstd.node_id"].decode()


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_actors_spread_a_joining_node_gets_work_and_a_lost_node_loses_nothing(tmp_path):
    from .raycluster import ClusterProcess

    (tmp_path / "in").mkdir()
    n_images = 480
    for k in range(n_images):
        (tmp_path / "in" / f"{k:04d}.png").write_bytes(good_image(k % 37))
    cluster = ClusterProcess({"num_cpus": 0, "_system_config": SYSTEM_CONFIG})
    try:
        first = cluster.add_node(num_cpus=1)
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        # three actors of one CPU each: two fit now, the third waits for a node (autoscaling)
        # a random-weight ViT (seeded alike in every replica) big enough that the run outlasts the
        # joining and the loss of a node: about 70 ms per image per core here
        model = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=96",
                 "--model-arg", "patch_size=8", "--model-arg", "num_classes=5"]  # fmt: skip
        cmd = [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output", str(out),
               *model, "--methods", "gae", "--actors", "3", "--cpus-per-actor", "1",
               "--shard-size", "4", "--batch-size", "2", "--no-progress", "--no-report",
               "--address", cluster.address]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        try:
            both = {first, second}
            _wait(lambda: both <= {_node_of(p) for p in _parts(out)}, proc, "both nodes committed a shard")
            third = cluster.add_node(num_cpus=1)  # a node joins mid-run
            _wait(lambda: third in {_node_of(p) for p in _parts(out)}, proc, "the new node got work")
            before = len(_parts(out))
            cluster.remove_node(first, allow_graceful=False)  # its raylet is killed: spot preemption
            assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        # Without --address the job starts its own cluster, even while another runs on the machine
        # (Ray's plain ray.init() would join that one).
        (tmp_path / "few").mkdir()
        for k in range(4):
            (tmp_path / "few" / f"{k}.png").write_bytes(good_image(k))
        alone = subprocess.run(
            [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "few"), "--output",
             str(tmp_path / "alone"), *model, "--methods", "gae", "--no-progress", "--no-report",
             "--cpus-per-actor", "0.5"],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert len(read_rows(tmp_path / "alone", ["image_id"])) == 4
    finally:
        cluster.shutdown()
    assert before < n_images // 4 - 10, "the job (nearly) finished before the node was removed"
    assert "actor lost on shard" in err or "replacing it" in err, err[-2000:]
    rows = read_rows(out, ["image_id", "method", "status"])
    ids = collections.Counter(r["image_id"] for r in rows)
    assert len(ids) == n_images and set(ids.values()) == {1}
    assert all(r["status"] == "ok" for r in rows)
    by_node = collections.Counter(_node_of(p) for p in _parts(out))
    assert {first, second, third} <= set(by_node)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["images"] == manifest["counts"]["ok"] == n_images
    assert sum(manifest["nodes"].values()) == manifest["counts"]["shards_done"]
    assert (out / "_SUCCESS").exists()
