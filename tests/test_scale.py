"""The job's shape at scale: a shard source that cannot finish before the input check has, a lease
taken before Ray (a second run is refused in seconds, without listing or starting anything), nothing
staged in the local temp folder, and a plan that an actor reads shard by shard."""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lnstd import storage
from lnstd.data import Item, Source
from lnstd.jobs.scheduler import CLOSED, ShardSource
from lnstd.output import Output
from lnstd.plan import Plan

from .jobhelpers import (
    ROOT,
    cli_in_process,
    good_image,
    model_flags,
    only_lease_files,
    read_rows,
    run_cli,
    tiny_checkpoint,
)

QUICK = ["--methods", "gae", "--shard-size", "4", "--no-progress", "--no-report", "--cpus-per-actor", "0.5"]


# --- the shard source ------------------------------------------------------------------------------
def test_a_shard_queued_at_the_moment_the_loop_drains_is_run():
    """The refresh check queues shard 5 and closes right after the scheduler found nothing to
    take: the source is not exhausted until the sentinel has been taken, so shard 5 still runs."""
    q: queue.Queue[int] = queue.Queue()
    src = ShardSource(3, committed={1}, refresh=q)
    assert [src.take(), src.take(), src.take()] == [0, 2, None]
    assert not src.exhausted  # the check may still add shards
    q.put(5)  # the check finishes exactly now
    q.put(CLOSED)
    assert not src.exhausted
    assert src.take() == 5
    assert src.take() is None and src.exhausted


def test_shards_queued_concurrently_are_all_taken_before_the_source_is_exhausted():
    for trial in range(200):
        q: queue.Queue[int] = queue.Queue()
        src = ShardSource(2, committed=set(), refresh=q)
        rng = random.Random(trial)

        def check(q: queue.Queue[int] = q, rng: random.Random = rng) -> None:
            time.sleep(rng.random() * 1e-3)
            for s in (2, 3):
                q.put(s)
            q.put(CLOSED)

        t = threading.Thread(target=check)
        t.start()
        taken = []
        while not src.exhausted:  # the scheduler's exit test, with nothing in flight
            s = src.take()
            if s is not None:
                taken.append(s)
        t.join()
        assert taken == [0, 1, 2, 3], trial


def test_retries_come_first_and_a_source_without_refresh_ends_with_the_plan():
    src = ShardSource(3, committed=set(), refresh=None)
    assert src.take() == 0
    src.retry(0)
    assert [src.take(), src.take(), src.take(), src.take()] == [0, 1, 2, None]
    assert src.exhausted


# --- the plan: read shard by shard, compact ----------------------------------------------------------
class Listed(Source):
    unique_ids = False

    def __init__(self, uris: list[str]) -> None:
        super().__init__("mem://manifest", storage.StorageOptions())
        self.uris = uris

    def items(self):
        return iter(Item(u, u) for u in self.uris)


def test_an_actor_reads_one_shard_from_the_plan_and_the_plan_is_compact(tmp_path):
    uris = [f"/data/imagenet/val/ILSVRC2012_val_{k:08d}.JPEG" for k in range(20_000)]
    plan = Plan.create(Output(str(tmp_path / "out")), Listed(uris), 256, part_rows=5_000)
    assert (plan.inputs, plan.shards, len(plan.meta["parts"])) == (20_000, 79, 5)  # 19 shards a part
    assert plan.bytes / plan.inputs < 20  # zstd, one record batch per shard
    again = Plan.load(Output(str(tmp_path / "out")))
    for shard in (0, 18, 19, 78):
        assert [it.uri for it in again.read_shard(shard)] == uris[shard * 256 : (shard + 1) * 256]


def test_a_repeated_uri_among_many_is_found_by_its_row(tmp_path):
    uris = [f"/d/{k}.png" for k in range(3000)]
    uris.insert(2500, uris[17])
    with pytest.raises(Exception, match=r"rows 18 and 2501 have the same image_id '/d/17.png'"):
        Plan.create(Output(str(tmp_path / "out")), Listed(uris), 100)
    assert not list((tmp_path / "out" / "_lnstd" / "plan").glob("*"))  # refused: no plan left
    plan = Plan.create(Output(str(tmp_path / "out")), Listed(uris), 100, dedupe=True)
    assert plan.inputs == 3000
    kept = [it.uri for s in range(plan.shards) for it in plan.read_shard(s)]
    assert kept == uris[:2500] + uris[2501:]


# --- the lease before anything expensive -----------------------------------------------------------
def test_a_second_run_is_refused_before_listing_or_ray(tmp_path, monkeypatch, no_ray):
    """A live lease on the output: the run stops at the lease, in one line, without Ray (importing it
    fails here) and without writing a plan."""
    import json

    ckpt = tiny_checkpoint(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(1))
    lease = tmp_path / "out" / "_lnstd" / "lease.json"
    lease.parent.mkdir(parents=True)
    now = time.time()
    holder = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "since": now - 3,
              "heartbeat": now, "ttl": 60.0, "run_id": "first"}  # fmt: skip
    lease.write_text(json.dumps(holder))
    t0 = time.time()
    code, err = cli_in_process("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                               *model_flags(ckpt), "--methods", "gae", "--no-progress")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "is being written by another run" in err, err
    assert time.time() - t0 < 30
    assert sorted(p.name for p in (tmp_path / "out" / "_lnstd").iterdir()) == ["lease.json", "lease.lock"]


# --- nothing in the temp folder; the output's own leftovers are cleaned ------------------------------
@pytest.mark.integration
def test_a_killed_run_leaves_nothing_in_the_temp_folder_and_the_rerun_cleans_the_output(tmp_path, request):
    ckpt = tiny_checkpoint(tmp_path)
    (tmp_path / "in").mkdir()
    for k in range(12):
        (tmp_path / "in" / f"i{k:02d}.png").write_bytes(good_image(2 * k + 1))
    scratch = Path(tempfile.mkdtemp(prefix="lt", dir="/tmp"))  # short: Ray's sockets live under it
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output", str(out),
            *model_flags(ckpt), "--methods", "gae", "--shard-size", "4", "--no-progress", "--no-report",
            "--cpus-per-actor", "0.5"]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "_lnstd" / "plan" / "plan.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies: no cleanup code runs
    proc.wait()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("lnstd-plan-")]
    # an interrupted listing of some earlier run: a part file with no plan.json pointing at it
    (out / "_lnstd" / "plan" / "part-00007.arrow").write_bytes(b"ARROW1 half written")
    r = run_cli(*args[3:], env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "_lnstd" / "plan").iterdir()) == ["part-00000.arrow", "plan.json"]
    rows = read_rows(out, ["image_id", "status"])
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("lnstd-plan-")]


def _job(tmp_path: Path, images: int) -> tuple[Path, list[str]]:
    """A folder of ``images`` small images and the arguments of a quick run over it: (out, args)."""
    ckpt = tiny_checkpoint(tmp_path)
    _add_images(tmp_path / "in", range(images))
    out = tmp_path / "out"
    return out, ["run", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt), *QUICK]


def _add_images(folder: Path, ks: range) -> None:
    folder.mkdir(exist_ok=True)
    for k in ks:
        (folder / f"i{k:02d}.png").write_bytes(good_image(2 * k + 1))


# --- outputs that heal --------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow  # two runs: about 40 s (the part checks alone: test_worker_faults, by default)
def test_a_truncated_and_an_empty_part_are_rewritten_by_the_rerun(tmp_path):
    import pyarrow.parquet as pq

    out, args = _job(tmp_path, 12)
    assert run_cli(*args).returncode == 0
    part0, part2 = out / "heatmaps" / "part-00000.parquet", out / "heatmaps" / "part-00002.parquet"
    part0.write_bytes(part0.read_bytes()[: part0.stat().st_size // 2])  # torn
    part2.write_bytes(b"")  # empty
    with pytest.raises(Exception):  # noqa: B017  (what a reader meets: any error of pyarrow's)
        pq.read_table(out / "heatmaps")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 committed part(s) unreadable, short or of another run: rewriting shard(s) 0, 2" in r.stderr
    rows = pq.read_table(out / "heatmaps", columns=["image_id", "status"]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == [f"i{k:02d}.png" for k in range(12)]
    assert {r["status"] for r in rows} == {"ok"} and (out / "_SUCCESS").exists()
    assert "12 images (12 ok, 0 errors)" in r.stderr


@pytest.mark.integration
@pytest.mark.slow  # three runs, one killed: about 50 s
def test_a_refresh_killed_after_the_plan_grew_leaves_no_stale_success(tmp_path):
    out, args = _job(tmp_path, 8)
    assert run_cli(*args).returncode == 0 and (out / "_SUCCESS").exists()
    _add_images(tmp_path / "in", range(8, 14))
    proc = subprocess.Popen([sys.executable, "-m", "lnstd", *args, "--refresh-input"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    plan = out / "_lnstd" / "plan" / "plan.json"
    deadline = time.time() + 180
    while time.time() < deadline and '"shards": 2,' in plan.read_text():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert '"shards": 4,' in plan.read_text()  # the plan grew before the kill
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(out, ["image_id"])
    assert sorted(r["image_id"] for r in rows) == [f"i{k:02d}.png" for k in range(14)]
    assert (out / "_SUCCESS").exists()


def test_pretrained_weights_that_cannot_be_had_fail_before_ray_in_seconds(tmp_path, monkeypatch, no_ray):
    """No cached weights and no hub (offline): one line naming --pretrained and the way out,
    before Ray (importing it fails here) and without the hub client's minute of retries."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(1))
    t0 = time.time()
    args = ["--model", "vit_tiny_patch16_224", "--pretrained", "--no-progress"]
    code, err = cli_in_process(
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *args
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "--pretrained: the weights of vit_tiny_patch16_224" in err and "--checkpoint" in err
    assert time.time() - t0 < 30 and not (tmp_path / "out").exists()


def test_ray_that_cannot_start_is_one_line_not_an_internal_error(tmp_path, monkeypatch):
    """Ray's own start-up failure (seen when many clusters start at once on a busy machine) is the
    user's one line, exit 2, and the fresh output is left empty."""
    import ray

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", timed_out)
    out, args = _job(tmp_path, 2)
    code, err = cli_in_process(*args)
    assert code == 2 and err.count("\n") == 2, err  # the plan line, then the error
    assert "this machine's Ray cluster could not start (The current node timed out" in err
    assert out.exists() and only_lease_files(out)  # the listing ran, and was removed by its holder


def test_a_failed_fresh_run_cleans_under_its_lease_and_a_racing_run_keeps_its_own(tmp_path, monkeypatch):
    """The clean-up of a fresh output whose run failed deletes the run's files, never the lease's: a
    second run that claims the output the moment the first lets go keeps its lease (the lock file and
    lease.json it wrote stay; generations only grow)."""
    import threading

    import ray

    from lnstd.errors import OutputLockedError
    from lnstd.jobs.lease import Lease
    from lnstd.output import Output

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", timed_out)
    out, args = _job(tmp_path, 2)
    claimed: list[Lease] = []
    stop = threading.Event()

    def second_run() -> None:  # claims the output as soon as the first run's lease allows it
        while not stop.is_set() and not (out / "_lnstd" / "run.json").exists():  # the first run holds it
            time.sleep(0.001)
        while not stop.is_set() and not claimed:
            lease = Lease(Output(str(out)), ttl=30)
            try:
                lease.acquire()
                claimed.append(lease)
            except (OutputLockedError, OSError):
                time.sleep(0.001)

    racer = threading.Thread(target=second_run)
    racer.start()
    code, err = cli_in_process(*args)
    racer.join(timeout=60)
    stop.set()
    assert code == 2 and "could not start" in err, err
    assert claimed, "the second run never got the output"
    b = claimed[0]
    try:
        assert b.verify() and b.generation >= 2  # still the holder, after the first run's clean-up
        assert (out / "_lnstd" / "lease.lock").exists() and (out / "_lnstd" / "lease.json").exists()
        assert not (out / "_lnstd" / "plan").exists() and not (out / "_lnstd" / "run.json").exists()
    finally:
        b.release()
