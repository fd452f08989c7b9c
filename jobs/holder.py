"""Who holds (or held) an output's lease, and whether that holder still lives: on this host by its
process (a pid and the process's identity beyond it), elsewhere by its heartbeat."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import dataclass

__all__ = ["Holder", "parse", "process_id"]


@dataclass
class Holder:
    """Who holds (or held) a lease. ``process`` names the holder's process on its host beyond its
    pid (:func:`process_id`: boot id and start time), so a later process that reuses the pid is
    not taken for it; empty in leases written before it was recorded."""

    token: str
    host: str
    pid: int
    since: float
    heartbeat: float
    ttl: float
    run_id: str = ""
    generation: int = 0
    released: bool = False
    process: str = ""

    def alive(self, now: float | None = None) -> bool:
        """Whether the lease is held. Not when released. On this host the holder's process decides
        first: gone (or its pid reused), the lease is free at once; another process that runs holds
        it whatever the heartbeat's age says, since the reader's clock may be ahead of the holder's.
        Otherwise the heartbeat decides, held while within its time-to-live of ``now``: another
        host; a paused process (which may be taken over); a lease without a process id; and this
        very process (one clock, so the age is exact, and that it runs says nothing of a lease
        in it that stopped renewing)."""
        if self.released:
            return False
        if self.host == socket.gethostname():
            state = _process_state(self.pid, self.process)
            if state == "gone":
                return False
            if state == "running" and self.pid != os.getpid():
                return True
        now = time.time() if now is None else now
        return now - self.heartbeat <= self.ttl

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        beat = max(0.0, time.time() - self.heartbeat)
        return f"pid {self.pid} on {self.host} since {since} (last heartbeat {beat:.0f} s ago)"


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (Linux), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def process_id(pid: int) -> str:
    """``BOOT_ID/START`` for a process of this host: the kernel's boot id and the process's start
    time in clock ticks since boot, which no later process with the same pid shares ("" where
    there is no ``/proc``). Neither depends on the wall clock."""
    fields = _stat(pid)
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""
    return f"{boot}/{int(fields[19])}" if fields is not None and len(fields) > 19 else ""


def _process_state(pid: int, process: str) -> str:
    """A holder's process on this host: "gone" (no such pid, a zombie, or a pid that a later
    process reuses), "running" (the very process: its recorded id matches), "paused" (stopped by a
    signal or a debugger) or "unknown" (no id recorded, or its ``/proc`` entry unreadable)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat(pid)
    if fields is None:  # no /proc, or hidden (hidepid), or it exited since os.kill: the heartbeat says
        return "unknown"
    if fields[0] in (b"Z", b"X"):
        return "gone"
    if process and process_id(pid) not in ("", process):
        return "gone"  # the pid now names a later process
    if fields[0] in (b"T", b"t"):
        return "paused"
    return "running" if process else "unknown"


def parse(data: bytes) -> Holder | None:
    """The holder recorded in a lease's bytes (None if they are not one)."""
    try:
        d = json.loads(data)
        h = Holder(**{k: d[k] for k in Holder.__dataclass_fields__ if k in d})
        h.generation, h.released = int(h.generation), bool(h.released)
        return h
    except (ValueError, TypeError, KeyError):
        return None
