"""The output lease has one holder: stale-lease races of 2 and 3 processes on a local folder and on
S3 (exactly one winner in 100 trials each), the generation (fencing token), verify() and fenced(),
and a lease write whose reply is lost (a fault-injecting proxy in front of the S3 server) that is
still recognised as this run's own."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from lnstd import storage
from lnstd.errors import LeaseLostError, OutputLockedError
from lnstd.jobs.lease import Lease
from lnstd.output import Output

from .s3proxy import FaultProxy

pytestmark = pytest.mark.integration

DEAD_PID = 2**22 + 17  # above Linux's largest pid_max: no process has it


def _stale(kind: str, generation: int) -> bytes:
    """A lease nobody holds any more: its process on this host is gone, or another host's heartbeat
    is long past its time-to-live."""
    now = time.time()
    if kind == "dead pid":
        h = {"host": socket.gethostname(), "pid": DEAD_PID, "heartbeat": now, "ttl": 60.0}
    else:
        h = {"host": "elsewhere.invalid", "pid": 1, "heartbeat": now - 120, "ttl": 1.0}
    return json.dumps({"token": "stale", "since": now - 300, "run_id": "old", "generation": generation,
                       **h}).encode()  # fmt: skip


def _racer(output: str, opts: storage.StorageOptions, ready, done, won, i: int, trials: int) -> None:
    """One racing process: in each trial, a new run (a new Lease) claims the output at the start line."""
    client = storage.s3_client(opts) if storage.is_s3(output) else None
    for _ in range(trials):
        lease = Lease(Output(output, opts), ttl=60.0)
        lease._s3_client = client  # connected before the start line: the race is the claim, not the setup
        ready.wait()
        try:
            lease.acquire()
            lease._stop.set()  # no heartbeats into the next trial; no release either
            won[i] = 1
        except OutputLockedError:
            won[i] = 0
        done.wait()  # a winner stays alive (its pid is checked) until every racer has decided
    os._exit(0)


def _race(output: str, opts: storage.StorageOptions, racers: int, kind: str, trials: int) -> None:
    """``trials`` races of ``racers`` processes for a stale lease: each has one winner, and the lease
    then holds the winner's pid and the next generation."""
    ctx = mp.get_context("fork")
    if storage.is_s3(output):
        client = storage.s3_client(opts)
        bucket, _, key = f"{output}/_lnstd/lease.json"[len("s3://") :].partition("/")

        def put(body: bytes) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=body)

        def get() -> dict:
            return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    else:
        path = Path(output) / "_lnstd" / "lease.json"
        path.parent.mkdir(parents=True, exist_ok=True)

        def put(body: bytes) -> None:
            path.write_bytes(body)

        def get() -> dict:
            return json.loads(path.read_bytes())

    ready, done = ctx.Barrier(racers + 1, timeout=30), ctx.Barrier(racers + 1, timeout=30)
    won = ctx.Array("i", [-1] * racers)
    procs = [ctx.Process(target=_racer, args=(output, opts, ready, done, won, i, trials))
             for i in range(racers)]  # fmt: skip
    for p in procs:
        p.start()
    winners, wrong = [], 0
    try:
        for t in range(trials):
            put(_stale(kind, generation=t))
            won[:] = [-1] * racers
            ready.wait()  # start
            done.wait()  # every racer has decided
            assert -1 not in list(won)
            winners.append(sum(won))
            if sum(won) == 1:  # the one winner's lease, one generation on
                holder = get()
                wrong += (holder["pid"], holder.get("generation")) != (procs[list(won).index(1)].pid, t + 1)
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    assert winners == [1] * trials, (
        f"{sum(w != 1 for w in winners)} of {trials} trials: {set(winners)} winners"
    )
    assert wrong == 0, f"{wrong} trials left another lease than the winner's, with the next generation"


@pytest.fixture
def s3_opts(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return storage.StorageOptions(s3_endpoint=s3_server.endpoint, region="us-east-1")


@pytest.mark.parametrize("kind", ["dead pid", "expired"])
@pytest.mark.parametrize("racers", [2, 3])
def test_a_stale_local_lease_raced_by_several_processes_has_one_winner(tmp_path, racers, kind):
    t0 = time.time()
    _race(str(tmp_path / "out"), storage.StorageOptions(), racers, kind, trials=100)
    assert time.time() - t0 < 30


@pytest.mark.parametrize(("racers", "kind"), [(2, "dead pid"), (3, "expired")])  # 100 trials: ~12 s each
def test_a_stale_s3_lease_raced_by_several_processes_has_one_winner(s3_server, s3_opts, racers, kind):
    bucket = f"race-{racers}-{kind.replace(' ', '-')}"
    s3_server.client().create_bucket(Bucket=bucket)
    t0 = time.time()
    _race(f"s3://{bucket}/out", s3_opts, racers, kind, trials=100)
    assert time.time() - t0 < 90


@pytest.mark.parametrize("where", ["local", "s3"])
def test_generation_verify_and_fenced(tmp_path, where, request):
    if where == "s3":
        opts = request.getfixturevalue("s3_opts")
        request.getfixturevalue("s3_server").client().create_bucket(Bucket="fence")
        output = "s3://fence/out"
    else:
        opts, output = storage.StorageOptions(), str(tmp_path / "out")
    a = Lease(Output(output, opts), ttl=0.8)
    a.acquire()
    assert a.generation == 1 and a.verify()
    with a.fenced():
        pass
    # an actor's view of the driver's lease, in another object (as in another process)
    actor = Lease.follow(Output(output, opts), a.token, a.generation, ttl=0.8)
    assert actor.verify()
    a._stop.set()  # a hangs: no more heartbeats
    a._thread.join()
    time.sleep(1.0)  # past the ttl
    b = Lease(Output(output, opts), ttl=0.8)
    b.acquire()  # taken over
    assert b.generation == 2 and b.verify()
    assert not a.verify() and not actor.verify()
    with pytest.raises(LeaseLostError, match="lost the output's lease") as exc, a.fenced():
        raise AssertionError("a commit of a run that lost its lease ran")
    assert "\n" not in str(exc.value)
    assert not a.renew()
    b.release()  # a tombstone: no holder, and the generation is kept for the next claim
    assert b.holder() is None and not b.verify()
    c = Lease(Output(output, opts), ttl=0.8)
    c.acquire()
    assert c.generation == 3
    c.release()


def test_a_local_commit_inside_fenced_cannot_interleave_with_a_takeover(tmp_path):
    """While a commit holds fenced(), a takeover waits for it; after it, the old holder's fenced()
    refuses."""
    output, opts = str(tmp_path / "out"), storage.StorageOptions()
    a = Lease(Output(output, opts), ttl=0.5)
    a.acquire()
    a._stop.set()
    a._thread.join()
    time.sleep(0.7)  # a's lease has expired; nobody has taken it yet
    b = Lease(Output(output, opts), ttl=0.5)
    taken = threading.Event()

    def take() -> None:
        b.acquire()
        taken.set()

    with a.fenced():  # still ours: nobody took it
        t = threading.Thread(target=take)
        t.start()
        time.sleep(0.5)
        assert not taken.is_set()  # the takeover waits for the commit to finish
    t.join(10)
    assert taken.is_set() and b.generation == 2
    with pytest.raises(LeaseLostError), a.fenced():
        pass
    b.release()


# --- a lost reply ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["drop", "503"])
def test_a_lease_write_whose_reply_is_lost_is_still_this_runs(s3_server, s3_opts, fault):
    bucket = f"lost-{fault}"
    s3_server.client().create_bucket(Bucket=bucket)
    proxy = FaultProxy(s3_server.endpoint)
    try:
        opts = storage.StorageOptions(s3_endpoint=proxy.endpoint, region="us-east-1")
        lease = Lease(Output(f"s3://{bucket}/out", opts), ttl=30.0)
        proxy.arm(fault)
        lease.acquire()  # create: If-None-Match applied, reply lost, the retry meets 412
        assert proxy.fired == [fault] and lease.generation == 1 and lease.verify()
        proxy.arm(fault)
        assert lease.renew() and proxy.fired == [fault] * 2  # renewal: If-Match, same
        assert lease.verify() and not lease.lost.is_set()
        proxy.arm(fault)
        lease.release()  # the tombstone too
        assert proxy.fired == [fault] * 3
        got = json.loads(
            s3_server.client().get_object(Bucket=bucket, Key="out/_lnstd/lease.json")["Body"].read()
        )
        assert got["token"] == lease.token and got["released"]
        # a takeover whose reply is lost: a killed run's lease on another host
        s3_server.client().put_object(Bucket=bucket, Key="out/_lnstd/lease.json", Body=_stale("expired", 7))
        other = Lease(Output(f"s3://{bucket}/out", opts), ttl=30.0)
        proxy.arm(fault)
        other.acquire()
        assert proxy.fired == [fault] * 4 and other.generation == 8 and other.verify()
        other.release()
    finally:
        proxy.close()


def test_the_fault_proxy_passes_pyarrows_chunked_uploads_through_unchanged(s3_server):
    """The proxy the fault tests stand behind forwards what pyarrow (the AWS C++ SDK) sends: a
    multipart upload whose parts come chunked with their checksum in a trailer (it dropped the
    trailer, and every part upload stalled until curl gave up)."""
    import pyarrow.fs as pafs

    s3_server.client().create_bucket(Bucket="proxied")
    proxy = FaultProxy(s3_server.endpoint)
    try:
        fs = pafs.S3FileSystem(
            access_key=s3_server.env["AWS_ACCESS_KEY_ID"], secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=proxy.endpoint.split("://")[1], scheme="http", region="us-east-1",
            request_timeout=10, connect_timeout=10,
        )  # fmt: skip
        data = os.urandom(6 << 20)  # more than one 5 MB part
        with fs.open_output_stream("proxied/big.bin") as f:
            f.write(data)
    finally:
        proxy.close()
    got = s3_server.client().get_object(Bucket="proxied", Key="big.bin")["Body"].read()
    assert got == data
