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
