"""Integrity, third pass: every write of a run goes through its Output under the lease's fence, a
write delayed past a takeover never reaches readers, and damaged states are one line.

The per-site tests pause a writer *inside* its fence (after the check, before the write), hand the
lease to a second run, then let the writer go on: locally the takeover cannot happen while the
writer is inside (it holds the lease's lock), so the write belongs to the old holder and the new
one sees it; on S3 the delayed publication finds its staged source removed by the new holder and
lands nothing."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest

from lnstd import storage
from lnstd.errors import LeaseLostError
from lnstd.jobs.lease import Lease
from lnstd.output import Output

from .jobhelpers import ROOT

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)


def _outputs(where: str, s3_server, tmp_path: Path) -> tuple[str, storage.StorageOptions]:
    if where == "local":
        return str(tmp_path / "out"), storage.StorageOptions()
    import os
    import uuid

    os.environ.update(s3_server.env)
    bucket = f"b{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/out", storage.StorageOptions(s3_endpoint=s3_server.endpoint)


class Paused:
    """A guard that checks the lease (``lease.fenced``), then waits at ``inside`` until released."""

    def __init__(self, lease: Lease) -> None:
        self.lease, self.inside, self.go = lease, threading.Event(), threading.Event()

    @contextlib.contextmanager
    def __call__(self):
        with self.lease.fenced():
            self.inside.set()
            assert self.go.wait(60)
            yield


SITES = {
    "write": lambda out: out.write(out.path("_manifest.json"), b'{"run_id": "A"}'),
    "create": lambda out: out.write(
        out.path("heatmaps", "part-00000.parquet"), b"A's part", create_only=True
    ),
    "delete": lambda out: out.delete(out.path("_SUCCESS")),
    "delete_tree": lambda out: out.delete_tree(out.path("_lnstd", "plan")),
}


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("site", list(SITES))
def test_a_writer_paused_inside_its_fence_never_changes_the_new_holders_output(
    where, site, request, tmp_path
):
    s3_server = request.getfixturevalue("s3_server") if where == "s3" else None
    uri, opts = _outputs(where, s3_server, tmp_path)
    seed = Output(uri, opts)
    seed.write(seed.path("_SUCCESS"), b"B's marker")
    seed.write(seed.path("_lnstd", "plan", "plan.json"), b"B's plan")
    a = Lease(Output(uri, opts), ttl=1.0)
    a.acquire()
    a._stop.set()  # A's heartbeat stops (a paused driver): its lease expires after 1 s
    out_a = Output(uri, opts)
    pause = Paused(a)
    out_a.fence_with(pause, a.generation, 1.0)
    result: dict[str, object] = {}

    def writer() -> None:
        try:
            result["value"] = SITES[site](out_a)
        except Exception as exc:  # the outcome is checked below
            result["error"] = exc

    t = threading.Thread(target=writer)
    t.start()
    assert pause.inside.wait(30)
    time.sleep(1.2)  # A's lease is now older than its time-to-live
    b = Lease(Output(uri, opts), ttl=30)
    claimed = threading.Thread(target=b.acquire)
    claimed.start()
    claimed.join(timeout=2)
    if where == "local":  # the takeover waits for A's fenced write to finish
        assert claimed.is_alive()
        pause.go.set()
        t.join(30)
        claimed.join(30)
        assert "error" not in result  # A's write happened before B held the output
    else:  # S3: B holds the output now; B's first step removes every older generation's staging
        assert not claimed.is_alive()
        out_b = Output(uri, opts)
        out_b.fence_with(b.fenced, b.generation, 30)
        out_b.sweep_staging()
        for name in ("_SUCCESS", "_lnstd/plan/plan.json"):  # B writes its own (S3 deletes are
            out_b.write(out_b.path(name), f"B's {name} of generation {b.generation}".encode())  # on ETags)
        before = {u: storage.read_bytes(u, opts) for u in _files(out_b)}
        pause.go.set()
        t.join(60)
        after = {u: storage.read_bytes(u, opts) for u in _files(out_b)}
        assert after == before, f"A's delayed {site} changed the new holder's output"
        assert isinstance(result.get("error"), (storage.StorageError, LeaseLostError)) or site.startswith(
            "delete"
        )
    assert b.verify()
    # After the takeover, A (lease lost) can neither write nor delete anything.
    out_a.fence_with(a.fenced, a.generation, 1.0)
    for other in SITES.values():
        with pytest.raises(LeaseLostError):
            other(out_a)
    b.release()


def _files(out: Output) -> list[str]:
    names = []
    for sub in ("", "heatmaps", "_lnstd/plan"):
        folder = out.path(sub) if sub else out.uri
        names += [storage.join(folder, n) for n in storage.list_names(folder, out.opts)]
    return sorted(names)


def test_every_write_of_the_job_goes_through_the_output():
    """The job layer and the plan write and delete only through Output (its fence): no direct
    storage write, delete or rename elsewhere."""
    direct = ("storage.write_bytes", "storage.write_new", "storage.delete_file", "storage.delete_tree",
              "os.replace", "os.remove", "os.rename", "shutil.rmtree")  # fmt: skip
    found = []
    for path in [*(ROOT / "jobs").glob("*.py"), ROOT / "lnstd" / "plan.py"]:
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if any(d + "(" in line for d in direct):
                found.append(f"{path.name}:{k}: {line.strip()}")
    lease = ROOT / "jobs" / "lease.py"  # the lease's own file is written by the lease (its protocol)
    assert [f for f in found if not f.startswith(lease.name)] == []


def test_a_run_that_lost_its_lease_cleans_nothing_of_the_new_holders(tmp_path):
    """A fresh output's failed run cleans up only while it holds the output (was: it deleted the
    new holder's plan, run.json, lease.json and node token)."""
    uri = str(tmp_path / "out")
    a = Lease(Output(uri), ttl=0.5)
    a.acquire()
    a._stop.set()
    time.sleep(0.7)
    b = Lease(Output(uri), ttl=30)
    b.acquire()
    out_b = Output(uri)
    out_b.fence_with(b.fenced, b.generation, 30)
    out_b.write_run("B", {"methods": ["gae"]})
    out_b.write(out_b.probe(b.token), b"B")
    out_a = Output(uri)
    out_a.fence_with(a.fenced, a.generation, 0.5)
    with pytest.raises(LeaseLostError):
        out_a.clear_results()
    assert json.loads((tmp_path / "out/_lnstd/run.json").read_text())["run_id"] == "B"
    assert (tmp_path / f"out/_lnstd/probe-{b.token}").exists() and b.verify()
    b.release()


# --- end to end: lnstd run and lnstd verify on a real output ---------------------------------------
FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae", "--shard-size", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from .jobhelpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _job(ckpt: Path, tmp_path: Path, n: int = 4) -> tuple[Path, list[str]]:
    from .jobhelpers import good_image, model_flags

    (tmp_path / "in").mkdir()
    for k in range(n):
        (tmp_path / "in" / f"i{k}.png").write_bytes(good_image(2 * k + 1))
    out = tmp_path / "out"
    return out, ["run", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt), *FAST]


def _rows(out: Path) -> list[tuple[str, str]]:
    from .jobhelpers import read_rows

    return sorted((r["image_id"], r["method"]) for r in read_rows(out, ["image_id", "method"]))


@pytest.mark.integration
def test_verify_names_a_stray_part_and_repair_removes_it_and_a_rerun_heals_it_too(ckpt, tmp_path):
    from .jobhelpers import run_cli

    out, args = _job(ckpt, tmp_path)
    assert run_cli(*args).returncode == 0
    code, text = _verify(out)
    assert code == 0 and "FAIL" not in text, text
    # another run's part, outside the plan (was: KeyError "shard 50 is not in the plan", every rerun)
    stray = out / "heatmaps" / "part-00050.parquet"
    stray.write_bytes((out / "heatmaps" / "part-00000.parquet").read_bytes())
    code, text = _verify(out)
    assert code == 1 and "part-00050.parquet (shard 50 is not in the plan's 2)" in text, text
    code, text = _verify(out, "--repair")
    assert f"removed {stray}" in text and not stray.exists() and code == 0, text
    stray.write_bytes((out / "heatmaps" / "part-00001.parquet").read_bytes())
    r = run_cli(*args)
    assert r.returncode == 0 and not stray.exists(), r.stderr
    assert _verify(out)[0] == 0


def _verify(out: Path, *flags: str) -> tuple[int, str]:
    import contextlib
    import io

    from lnstd.cli import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["verify", str(out), *flags])
    return code, text.getvalue()


@pytest.mark.integration
def test_a_lost_plan_record_with_a_changed_input_is_one_line_not_a_shifted_plan(ckpt, tmp_path):
    """plan.json deleted, one image added: the input must not be listed again under committed parts
    (was: exit 0, _SUCCESS, one image twice and the new one missing)."""
    from .jobhelpers import cli_in_process, good_image, run_cli

    out, args = _job(ckpt, tmp_path)
    assert run_cli(*args).returncode == 0
    (out / "_lnstd" / "plan" / "plan.json").unlink()
    (tmp_path / "in" / "a-new.png").write_bytes(good_image(99))
    code, err = cli_in_process(*args)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out}/_lnstd/plan/plan.json is missing" in err and "--overwrite" in err
    assert _rows(out) == [(f"i{k}.png", "gae") for k in range(4)]  # nothing changed


@pytest.mark.integration
@pytest.mark.slow  # two runs end to end, about 55 s; the default run checks the same healing on a stray part
def test_another_runs_part_landing_mid_run_is_removed_and_its_shard_done_again(ckpt, tmp_path):
    """A part of another run appears in the shard range while the run works (a delayed write):
    the run removes it and does the shard itself (was: counted out but kept, no _SUCCESS, exit 0)."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from .jobhelpers import run_cli

    out, args = _job(ckpt, tmp_path, n=8)
    other = tmp_path / "other"
    r = run_cli(*[a if a != str(out) else str(other) for a in args])
    assert r.returncode == 0, r.stderr[-2000:]
    foreign = (other / "heatmaps" / "part-00003.parquet").read_bytes()  # same inputs, another run
    proc = subprocess.Popen([sys.executable, "-m", "lnstd", *args, "--actors", "1"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "_lnstd" / "run.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    (out / "heatmaps").mkdir(exist_ok=True)
    (out / "heatmaps" / "part-00003.parquet").write_bytes(foreign)  # before the run reaches shard 3
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    run_id = json.loads((out / "_lnstd" / "run.json").read_text())["run_id"]
    ids = {pq.read_metadata(p).metadata[b"lnstd.run_id"].decode() for p in (out / "heatmaps").iterdir()}
    assert ids == {run_id} and (out / "_SUCCESS").exists()
    assert _rows(out) == sorted((f"i{k}.png", "gae") for k in range(8))
    assert _verify(out)[0] == 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("release", ["mid-run", "after-success"])
def test_s3_a_part_held_past_the_fence_never_lands_in_the_next_runs_output(
    ckpt, tmp_path, s3_server, release
):
    """Attack 3: a proxy holds run A's publication of a part after A's fence check; A's driver is
    paused until its lease expires; B takes the output (--overwrite, another input and method); the
    held request is released while B runs, or after B's _SUCCESS. Was: A's part landed in B's
    output (a mixed dataset under _SUCCESS, and every later run failed on a shard not in the plan)."""
    import os
    import signal
    import subprocess
    import sys
    import uuid

    import pyarrow.parquet as pq

    from .jobhelpers import good_image, model_flags
    from .s3proxy import FaultProxy

    env = {**os.environ, **s3_server.env, "RAY_ADDRESS": ""}
    bucket = f"attack3-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/out"
    for name, n in (("in-a", 8), ("in-b", 2)):
        (tmp_path / name).mkdir()
        for k in range(n):
            (tmp_path / name / f"{name}-{k}.png").write_bytes(good_image(3 * k + len(name)))
    proxy = FaultProxy(s3_server.endpoint)
    proxy.hold(lambda method, path, headers: method == "PUT" and "/out/heatmaps/part-00002" in path)
    common = [
        *model_flags(ckpt),
        "--no-progress",
        "--no-report",
        "--cpus-per-actor",
        "0.5",
        "--shard-size",
        "2",
    ]
    a_args = ["run", "--input", str(tmp_path / "in-a"), "--output", out, "--s3-endpoint", proxy.endpoint,
              "--lease-ttl", "4", "--actors", "1", "--methods", "gae", *common]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    a = subprocess.Popen([sys.executable, "-m", "lnstd", *a_args], cwd=ROOT, env=env, **quiet)
    try:
        assert proxy.held.wait(240), "run A never published shard 2"
        os.kill(a.pid, signal.SIGSTOP)  # A's driver stops renewing: its lease expires in 4 s
        time.sleep(6)
        b_args = [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in-b"), "--output", out,
                  "--s3-endpoint", s3_server.endpoint, "--overwrite", "--methods", "gradcam",
                  *common]  # fmt: skip
        b = subprocess.Popen(b_args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        if release == "mid-run":
            client = s3_server.client()
            deadline = time.time() + 240
            while time.time() < deadline and b.poll() is None:
                if client.list_objects_v2(Bucket=bucket, Prefix="out/_lnstd/run.json").get("KeyCount"):
                    break
                time.sleep(0.05)
            proxy.release()
        _, err = b.communicate(timeout=300)
        assert b.returncode == 0, err[-2000:]
        proxy.release()
        deadline = time.time() + 60
        while not proxy.landed and time.time() < deadline:
            time.sleep(0.1)
        assert proxy.landed and proxy.landed[0] != 200, "A's held write was applied"
    finally:
        proxy.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
        a.wait(60)
    fs = s3_server.fs()
    parts = [
        i.path for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(f"{bucket}/out/heatmaps"))
    ]
    run_id = json.loads(
        s3_server.client().get_object(Bucket=bucket, Key="out/_lnstd/run.json")["Body"].read()
    )["run_id"]
    tables = [pq.read_table(p, filesystem=fs) for p in parts]
    assert {pq.read_metadata(p, filesystem=fs).metadata[b"lnstd.run_id"].decode() for p in parts} == {run_id}
    rows = sorted(
        (r["image_id"], r["method"]) for t in tables for r in t.select(["image_id", "method"]).to_pylist()
    )
    assert rows == [("in-b-0.png", "gradcam"), ("in-b-1.png", "gradcam")]
    s3_server.client().head_object(Bucket=bucket, Key="out/_SUCCESS")
    os.environ.update(s3_server.env)
    code, text = _verify_s3(out, s3_server.endpoint)
    assert code == 0, text


def _verify_s3(out: str, endpoint: str) -> tuple[int, str]:
    import contextlib
    import io

    from lnstd.cli import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["verify", out, "--s3-endpoint", endpoint])
    return code, text.getvalue()
