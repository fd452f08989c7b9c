"""Noise: what native code (Ray's core, Arrow, the AWS SDK) writes to file descriptor 2 goes to a
log file, and the user sees lnstd's own lines; ``-v`` shows everything; when native code ends the
run, its last line is shown in one line. (The end-to-end check, a real run whose Ray logger writes
natively, is in test_names.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .jobhelpers import ROOT

pytestmark = pytest.mark.integration

SCRIPT = r"""
import ctypes, os, sys
from lnstd.native_log import native_output_to_log
libc = ctypes.CDLL(None)
dump = b"[raylet] state dump line 1\n[raylet] state dump line 2\n"
for mode in ("ok", "fail", "verbose"):
    log = None
    try:
        with native_output_to_log(verbose=mode == "verbose") as log:
            libc.write(2, dump, len(dump))  # C code's write(2, ...), as Ray's and Arrow's loggers do
            print(f"lnstd: {mode}", file=sys.stderr)
            if mode == "fail":
                raise RuntimeError
    except RuntimeError:
        pass
    print(log, flush=True)
# Ray's core worker when the GCS is gone: a message, then exit(1), with no Python to say why
with native_output_to_log(verbose=False):
    print("lnstd: plan: 2 inputs", file=sys.stderr)
    gone = b"[E rpc_client.h:204] Failed to connect to GCS within 60 s. The program will terminate.\n"
    libc.write(2, gone, len(gone))
    libc._exit(1)
"""


def test_native_diagnostics_go_to_a_log_and_the_user_sees_lnstds_lines():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    ok, fail, verbose = r.stdout.split()
    lines = r.stderr.splitlines()
    assert lines[:2] == ["lnstd: ok", "lnstd: fail"]  # quiet: the native lines went to the log
    assert lines[2:5] == ["[raylet] state dump line 1", "[raylet] state dump line 2", "lnstd: verbose"]
    assert verbose == "None"
    assert "lnstd-native-" in ok and not os.path.exists(ok)  # removed after a body that went well
    with open(fail) as f:  # kept after one that failed, for whoever looks into it
        assert f.read() == "[raylet] state dump line 1\n[raylet] state dump line 2\n"
    os.remove(fail)
    # native code ended the process: its last line, in one line, with where the rest is
    assert lines[5:6] == ["lnstd: plan: 2 inputs"] and len(lines) == 7
    prefix = "lnstd: error: the run ended abruptly; native code's last words: [E rpc_client.h:204] Failed to"
    assert lines[6].startswith(prefix)
    log = lines[6].split("(all: ")[1].rstrip(")")
    with open(log) as f:
        assert "The program will terminate." in f.read()
    os.remove(log)


def test_a_killed_run_with_nothing_native_to_say_leaves_no_log_and_no_line():
    script = (
        "import os, signal\nfrom lnstd.native_log import native_output_to_log\n"
        "with native_output_to_log(verbose=False) as log:\n"
        "    print(log, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == -9 and r.stderr == ""
    assert "lnstd-native-" in r.stdout and not os.path.exists(r.stdout.strip())
