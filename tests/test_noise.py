"""Noise: what native code (Ray's core, Arrow, the AWS SDK) writes to file descriptor 2 goes to a
log file, and the user sees lnstd's own lines; ``-v`` shows everything. (The end-to-end check, a
real run whose Ray logger writes natively, is in test_names.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .jobhelpers import ROOT

pytestmark = pytest.mark.integration

SCRIPT = r"""
import ctypes, os, sys
from lnstd.cli import native_output_to_log
libc = ctypes.CDLL(None)
dump = b"[raylet] state dump line 1\n[raylet] state dump line 2\n"
if sys.argv[1] == "fatal":  # Ray's core worker when the GCS is gone: a message, then exit(1)
    with native_output_to_log(verbose=False):
        print("lnstd: plan: 2 inputs", file=sys.stderr)
        gone = b"[E rpc_client.h:204] Failed to connect to GCS within 60 s. The program will terminate.\n"
        libc.write(2, gone, len(gone))
        libc._exit(1)
for outcome in ("ok", "fail"):
    log = None
    try:
        with native_output_to_log(verbose=sys.argv[1] == "v") as log:
            libc.write(2, dump, len(dump))  # C code's write(2, ...), as Ray's and Arrow's loggers do
            print(f"lnstd: {outcome}", file=sys.stderr)
            if outcome == "fail":
                raise RuntimeError
    except RuntimeError:
        pass
    print(log)
print("lnstd: after", file=sys.stderr)
"""


def _script(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)  # fmt: skip


def test_native_diagnostics_go_to_the_log_and_the_user_sees_one_line():
    r = _script("quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "lnstd: ok\nlnstd: fail\nlnstd: after\n"
    ok, fail = r.stdout.split()
    assert "lnstd-native-" in ok and not os.path.exists(ok)  # removed after a body that went well
    with open(fail) as f:  # kept after one that failed, for whoever looks into it
        assert f.read() == "[raylet] state dump line 1\n[raylet] state dump line 2\n"
    os.remove(fail)


def test_verbose_shows_the_native_diagnostics():
    r = _script("v")
    assert r.returncode == 0 and r.stdout.split() == ["None", "None"]
    assert r.stderr.count("[raylet] state dump line 1\n") == 2 and "lnstd: fail\n" in r.stderr


def test_when_native_code_ends_the_run_its_last_line_is_shown_in_one_line():
    r = _script("fatal")
    assert r.returncode == 1
    first, second = r.stderr.splitlines()  # our own line, and the keeper's one line
    assert first == "lnstd: plan: 2 inputs"
    assert second.startswith("lnstd: error: the run was ended by native code: [E rpc_client.h:204] Failed to")
    log = second.split("(its output: ")[1].rstrip(")")
    with open(log) as f:
        assert "Failed to connect to GCS" in f.read()
    os.remove(log)
