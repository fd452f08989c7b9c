"""The attribution actor's faults, by type, on the actor class itself (no Ray): out-of-memory halves
the batch, a lone image the model fails on is that image's error row, a reader's OSError (h5py) is
that input's error row; in every case the shard commits with one row per input and method."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from lnstd.config import RunConfig
from lnstd.data import open_source
from lnstd.jobs.worker import ShardWorker
from lnstd.output import Output
from lnstd.plan import Plan

from .jobhelpers import TINY_ARGS, TINY_MODEL, good_image, tiny_checkpoint


def _worker(inp: Path, out: Path, ckpt: Path, batch_size: int, shard_size: int = 64) -> ShardWorker:
    cfg = RunConfig(input=str(inp), output=str(out), model=TINY_MODEL, methods=["gae", "lnstd"],
                    checkpoint=str(ckpt), model_args=dict(TINY_ARGS), batch_size=batch_size,
                    shard_size=shard_size)  # fmt: skip
    Plan.create(Output(str(out)), open_source(str(inp)), shard_size)
    return ShardWorker(cfg.to_dict(), "test-run")


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for k in range(n):
        (folder / f"img{k:02d}.png").write_bytes(good_image(2 * k + 1))


def _rows(out: Path, shard: int = 0) -> list[dict]:
    return pq.read_table(Output(str(out)).part(shard)).to_pylist()


def test_device_out_of_memory_halves_the_batch_and_every_row_is_ok(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 8)
    reference = _worker(tmp_path / "in", tmp_path / "ref", ckpt, batch_size=8)
    assert reference.process(0).ok == 8
    worker = _worker(tmp_path / "in", tmp_path / "out", ckpt, batch_size=8)
    real = worker.explainer
    sizes = []

    def small_device(x, target=None):  # a device that holds at most 2 images' activations
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, target)

    worker.explainer = small_device
    res = worker.process(0)
    assert (res.ok, res.errors) == (8, 0)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved down to what fits, never to one image each
    rows, ref = _rows(tmp_path / "out"), _rows(tmp_path / "ref")
    assert [r["status"] for r in rows] == ["ok"] * 16
    for r, e in zip(rows, ref):
        assert (r["image_id"], r["method"]) == (e["image_id"], e["method"])
        np.testing.assert_allclose(r["heatmap"], e["heatmap"], rtol=1e-5, atol=1e-7)


def test_out_of_memory_on_one_image_fails_the_shard_with_that_reason(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 3)
    worker = _worker(tmp_path / "in", tmp_path / "out", ckpt, batch_size=4)

    def no_memory(x, target=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    worker.explainer = no_memory
    try:
        worker.process(0)
        raise AssertionError("the shard should have failed")
    except torch.OutOfMemoryError as exc:
        assert "out of memory" in str(exc)
    assert not Path(Output(str(tmp_path / "out")).part(0)).exists()  # nothing committed


def test_a_lone_image_the_model_fails_on_is_one_error_row_and_the_shard_commits(tmp_path):
    """The last batch holds only the bad image (5 images, batches of 2): it is that image's error row."""
    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 4)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "in" / "img99.png")  # listed last
    worker = _worker(tmp_path / "in", tmp_path / "out", ckpt, batch_size=2)
    real = worker.explainer

    def fails_on_white(x, target=None):  # the model raises on the all-white image alone
        if (x.flatten(1).min(1).values == x.max()).any():
            raise ValueError("non-finite relevance")
        return real(x, target)

    worker.explainer = fails_on_white
    res = worker.process(0)
    assert (res.images, res.ok, res.errors) == (5, 4, 1)
    rows = _rows(tmp_path / "out")
    bad = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 10 and {r["image_id"] for r in bad} == {"img99.png"} and len(bad) == 2
    assert bad[0]["error"] == "attribution failed" and "non-finite relevance" in bad[0]["error_detail"]


def test_an_unreadable_mat_file_is_each_inputs_error_row(tmp_path):
    """The .mat file breaks after the plan was made: h5py's OSError is a per-input error row."""
    from .test_newcomer import _write_mat

    ckpt = tiny_checkpoint(tmp_path)
    mat = tmp_path / "gtsegs.mat"
    _write_mat(mat, n=3)
    worker = _worker(mat, tmp_path / "out", ckpt, batch_size=2)
    mat.write_bytes(mat.read_bytes()[:300])  # truncated: h5py cannot open it
    try:
        h5py.File(mat, "r")
        raise AssertionError("h5py should refuse the truncated file")
    except OSError:
        pass
    res = worker.process(0)
    assert (res.images, res.ok, res.errors) == (3, 0, 3)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 6 and {r["error"] for r in rows} == {"unreadable"}
    assert all("OSError" in r["error_detail"] for r in rows)


def test_the_driver_counts_only_parts_that_are_readable_complete_and_this_runs(tmp_path):
    """The check a rerun makes of every committed part (and the driver before _SUCCESS): a torn, an
    empty and another run's part are left out of the totals; with the lease, they are removed."""
    from lnstd.jobs.attribute import verify_parts
    from lnstd.jobs.lease import Lease

    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 8)
    out = tmp_path / "out"
    worker = _worker(tmp_path / "in", out, ckpt, batch_size=4, shard_size=2)
    for shard in range(4):
        assert worker.process(shard).ok == 2
    cfg = RunConfig(**{**worker.cfg.to_dict()})
    output = Output(str(out))
    plan = Plan.load(output)
    committed = {0, 1, 2, 3}
    totals = verify_parts(output, plan, committed, "test-run", len(cfg.methods), cfg.topk, heal=None)
    assert totals == {"images": 8, "ok": 8, "errors": 0} and committed == {0, 1, 2, 3}
    part = [Path(output.part(s)) for s in range(4)]
    part[0].write_bytes(part[0].read_bytes()[:200])  # torn
    part[1].write_bytes(b"")  # empty
    other = set(committed)
    assert (
        verify_parts(output, plan, other, "another-run", len(cfg.methods), cfg.topk, heal=None)["images"] == 0
    )
    assert other == set()  # written by another run: none counts
    lease = Lease(output)
    lease.acquire()
    totals = verify_parts(output, plan, committed, "test-run", len(cfg.methods), cfg.topk, heal=lease)
    lease.release()
    assert totals == {"images": 4, "ok": 4, "errors": 0} and committed == {2, 3}
    assert not part[0].exists() and not part[1].exists() and part[2].exists()
