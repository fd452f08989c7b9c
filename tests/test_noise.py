"""Noise: what native code (Ray's core, Arrow, the AWS SDK) writes to file descriptor 2 goes to a
log file, and the user sees lnstd's own lines; ``-v`` shows everything; when native code ends the
run, its last line is shown in one line. (The end-to-end check, a real run whose Ray logger writes
natively, is in test_names.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
        "import os, signal, sys\nfrom lnstd.native_log import native_output_to_log\n"
        "with native_output_to_log(verbose=False) as log:\n"  # (sys.stdout goes to the log inside)
        "    print(log, file=sys.__stdout__, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == -9 and r.stderr == ""
    assert "lnstd-native-" in r.stdout and not os.path.exists(r.stdout.strip())


def _read_pty(fd: int, seconds: float) -> bytes:
    """What the terminal shows within ``seconds`` (b"" once the program has closed it)."""
    import select

    out = b""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has gone
            chunk = b""
        if not chunk:
            break
        out += chunk
    return out


def test_ctrl_c_in_a_terminal_exits_130_in_one_line_and_leaves_no_log(ckpt, tmp_path, request):
    """A real pseudo-terminal: Ctrl-C typed while shards run reaches the whole foreground process
    group (the driver, its log keeper, what else the terminal runs) as it does for a user. The run
    exits 130 with one line saying so: no traceback, no "internal error", no native log left."""
    import pty

    from .jobhelpers import good_image, model_flags

    (tmp_path / "in").mkdir()
    for k in range(400):
        (tmp_path / "in" / f"i{k:03d}.png").write_bytes(good_image(k))
    # the run's TMPDIR, to find its log; short, as Ray keeps its Unix sockets under it (107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="lnstd-t-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output", str(out),
            *model_flags(ckpt), "--methods", "gae", "--batch-size", "2", "--shard-size", "4"]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own, the terminal's foreground process group
        try:
            # as an interactive shell starts a foreground command: Ctrl-C at its default, even when
            # pytest itself was started in the background of a script (which ignores SIGINT, and an
            # ignored signal stays ignored across exec: the run never sees the Ctrl-C)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execve(sys.executable, argv, {**os.environ, "TMPDIR": str(tmp)})
        finally:
            os._exit(127)  # never back into pytest
    before = b""
    deadline = time.monotonic() + 600
    while not list((out / "heatmaps").glob("part-*.parquet")) and time.monotonic() < deadline:
        before += _read_pty(fd, 0.5)
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            shown = before.decode(errors="replace")[-2000:]
            pytest.fail(f"the run ended before any shard was written: {shown}")
    assert list((out / "heatmaps").glob("part-*.parquet")), before.decode(errors="replace")[-2000:]
    os.write(fd, b"\x03")  # the terminal's interrupt character: SIGINT to the foreground group
    after = b""
    while chunk := _read_pty(fd, 120):
        after += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    shown = after.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 130, shown
    lines = [ln.strip() for ln in shown.replace("\r", "\n").split("\n") if ln.strip().startswith("lnstd")]
    assert lines == ["lnstd: interrupted (a rerun of the same command resumes)"], shown
    for bad in ("Traceback", "KeyboardInterrupt", "internal error", "BrokenPipe"):
        assert bad not in shown, shown
    assert sorted(p.name for p in tmp.glob("lnstd-native-*")) == []
