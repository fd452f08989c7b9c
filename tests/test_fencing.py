"""Fenced commits: an actor of a run whose lease was taken commits nothing afterwards, whatever its
driver does; the output then holds one configuration only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lnstd import storage
from lnstd.config import RunConfig
from lnstd.data import open_source
from lnstd.errors import LeaseLostError
from lnstd.jobs.lease import Lease
from lnstd.jobs.worker import ShardWorker
from lnstd.output import Output
from lnstd.plan import Plan

from .jobhelpers import ROOT, TINY_ARGS, TINY_MODEL, good_image, model_flags, run_cli, tiny_checkpoint


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for k in range(n):
        (folder / f"img{k:03d}.png").write_bytes(good_image(2 * k + 1))


def test_an_actor_whose_run_lost_the_lease_commits_nothing(tmp_path):
    """Run A's actor finishes a shard after run B took A's expired lease over: the commit is refused
    (LeaseLostError) and no part appears; B's own actor commits the same shard."""
    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 3)
    out = str(tmp_path / "out")
    opts = storage.StorageOptions()
    a = Lease(Output(out, opts), ttl=0.5)
    a.acquire()
    a._stop.set()  # A's driver stops renewing (paused, killed, cut off)
    Plan.create(Output(out, opts), open_source(str(tmp_path / "in")), 8)
    cfg = RunConfig(input=str(tmp_path / "in"), output=out, model=TINY_MODEL, methods=["gae"],
                    checkpoint=str(ckpt), model_args=dict(TINY_ARGS), lease_ttl=0.5)  # fmt: skip
    actor_a = ShardWorker(cfg.to_dict(), "run-a", (a.token, a.generation))
    time.sleep(1.0)  # A's lease expires
    b = Lease(Output(out, opts), ttl=30)
    b.acquire()
    assert b.generation == a.generation + 1
    with pytest.raises(LeaseLostError):
        actor_a.process(0)
    assert not Path(Output(out, opts).part(0)).exists()
    actor_b = ShardWorker(cfg.to_dict(), "run-b", (b.token, b.generation))
    assert actor_b.process(0).ok == 3
    assert pq.read_metadata(Output(out, opts).part(0)).metadata[b"lnstd.run_id"] == b"run-b"
    b.release()


def _digest_parts(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "heatmaps").glob("*.parquet"))
    }


@pytest.mark.integration
@pytest.mark.slow  # two runs end to end, paused and resumed: about 40 s
def test_a_paused_run_whose_lease_was_taken_over_changes_nothing_when_it_resumes(tmp_path):
    """Driver A and its actor are paused (SIGSTOP) mid-run; A's lease expires; B takes the output
    over with --overwrite and other methods and finishes; then A's actor and driver resume. A's
    actor finishes the shards it held but commits none of them, A's driver exits 2, and the output
    is B's alone, byte for byte."""
    ckpt = tiny_checkpoint(tmp_path)
    _images(tmp_path / "in", 160)
    out = tmp_path / "out"
    base = ["--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt), "--shard-size", "4",
            "--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--lease-ttl", "3"]  # fmt: skip
    cmd = [sys.executable, "-m", "lnstd", "run", *base, "--methods", "gae,lnstd", "-v"]
    a = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    actor_pid, seen = None, ""
    deadline = time.time() + 180
    try:
        while time.time() < deadline and a.poll() is None:
            ready, _, _ = select.select([a.stderr], [], [], 0.05)
            if ready:
                line = a.stderr.readline()
                seen += line
                if "actor 0 ready (pid " in line:
                    actor_pid = int(line.split("(pid ")[1].split(",")[0])
            if actor_pid and list((out / "heatmaps").glob("part-*.parquet")):
                break
        assert actor_pid, seen[-3000:]
        os.kill(a.pid, signal.SIGSTOP)
        os.kill(actor_pid, signal.SIGSTOP)
        done_by_a = len(list((out / "heatmaps").glob("part-*.parquet")))
        assert done_by_a < 40, "A finished before it could be paused: nothing would be tested"
        time.sleep(4)  # A's lease (ttl 3 s) expires
        b = run_cli("run", *base, "--methods", "rollout", "--overwrite")
        assert b.returncode == 0, b.stderr[-3000:]
        after_b = _digest_parts(out)
        assert len(after_b) == 40
        os.kill(actor_pid, signal.SIGCONT)  # A's actor finishes what it held and tries to commit
        time.sleep(5)
        os.kill(a.pid, signal.SIGCONT)
        a.wait(timeout=120)
        assert a.returncode == 2, seen[-2000:]
        said = [ln for ln in a.stderr.read().splitlines() if ln.startswith("lnstd: ")]  # -v adds Ray's
        assert not [ln for ln in said if "retrying" in ln], said  # stops at once: no shard retried
        assert [ln for ln in said if "lost the output's lease" in ln] == said[-1:], said
        assert _digest_parts(out) == after_b  # nothing of A's landed after B took over
        rows = pq.read_table(out / "heatmaps", columns=["image_id", "method"]).to_pylist()
        assert {r["method"] for r in rows} == {"rollout"} and len(rows) == 160
        assert len({r["image_id"] for r in rows}) == 160
        assert (out / "_SUCCESS").exists()
    finally:
        for pid in (a.pid, actor_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if a.poll() is None:
            a.kill()
