"""A lease holder on this host is judged by its process before its heartbeat's age (issue 26,
item 8): a reader whose clock is ahead by more than the time-to-live does not take a live run's
lease; a paused holder, a killed one, a zombie and a pid reused by a later process still lose it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lnstd.errors import OutputLockedError
from lnstd.jobs.lease import Holder, Lease
from lnstd.output import Output

from .jobhelpers import ROOT

AHEAD = 3600.0  # the reader's clock, ahead of the holder's by an hour (ttl: 2 s)

_HOLDER = """
import sys, time
from lnstd.jobs.lease import Lease
from lnstd.output import Output
lease = Lease(Output(sys.argv[1]), ttl=2.0, run_id="live")
lease.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(out: Path) -> Holder:
    return Holder(**{k: v for k, v in json.loads((out / "_lnstd" / "lease.json").read_text()).items()})


@pytest.fixture
def live(tmp_path):
    """A real run's lease: a second process holds the output and renews its heartbeat."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "held"
        yield out, p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait()


def test_a_reader_whose_clock_is_ahead_does_not_take_a_live_runs_lease(live):
    out, p = live
    h = _holder(out)
    assert h.pid == p.pid and not h.released
    assert h.alive(now=time.time() + AHEAD)  # its process runs: held, whatever the clocks say
    assert h.alive(now=time.time())
    with pytest.raises(OutputLockedError, match=f"pid {p.pid}"):
        Lease(Output(str(out)), ttl=2.0).acquire()


def test_a_paused_holder_is_judged_by_its_heartbeat(live):
    out, p = live
    os.kill(p.pid, signal.SIGSTOP)
    time.sleep(0.5)  # its state reads "stopped"
    h = _holder(out)
    assert h.alive(now=h.heartbeat + 1.0)  # within its ttl: still held
    assert not h.alive(now=h.heartbeat + 3.0)  # past it: a paused run may be taken over
    time.sleep(max(0.0, h.heartbeat + 2.5 - time.time()))
    taker = Lease(Output(str(out)), ttl=2.0)
    taker.acquire()  # the takeover the fencing tests rely on
    assert _holder(out).token == taker.token and _holder(out).generation == h.generation + 1
    taker.release()


def test_a_killed_holder_and_a_zombie_lose_the_lease_at_once(live):
    out, p = live
    h = _holder(out)
    os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.5)  # not reaped yet: a zombie, which os.kill(pid, 0) still finds
    with open(f"/proc/{p.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
    assert not h.alive(now=h.heartbeat)  # fresh heartbeat, but its process is gone
    p.wait()
    assert not h.alive(now=h.heartbeat)


def test_a_pid_reused_by_a_later_process_is_not_the_holder_and_one_process_reads_one_clock(tmp_path):
    lease = Lease(Output(str(tmp_path / "out")), ttl=2.0)
    lease.acquire()
    try:
        h = _holder(tmp_path / "out")
        assert h.pid == os.getpid() and h.process  # this process, named beyond its pid
        # in the holder's own process one clock reads both: the heartbeat's age decides
        assert h.alive(now=time.time()) and not h.alive(now=time.time() + AHEAD)
        boot, start = h.process.rsplit("/", 1)
        h.process = f"{boot}/{int(start) - 1}"  # the same pid, started at another time
        assert not h.alive(now=time.time())
    finally:
        lease.release()


def test_an_old_lease_without_a_process_id_is_judged_by_its_heartbeat():
    import socket

    h = Holder("t", socket.gethostname(), os.getpid(), time.time(), time.time(), 2.0)
    assert h.alive(now=time.time()) and not h.alive(now=time.time() + AHEAD)
    other = Holder("t", "elsewhere.invalid", 1, time.time(), time.time(), 2.0, process="x/1")
    assert other.alive(now=time.time()) and not other.alive(now=time.time() + AHEAD)
