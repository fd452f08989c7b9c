"""Native output of ``lnstd run`` (Ray's core worker, Arrow, the AWS SDK) kept out of the user's
terminal, in ``$TMPDIR/lnstd-native-*.log``.

:func:`native_output_to_log` points file descriptor 2 at a pipe; a small keeper process, this file
run as a script (``python native_log.py LOG OUTPUT_FD LIFELINE_FD``, :func:`keep`), copies the pipe
into LOG. The driver writes a word on LIFELINE_FD when it finishes by itself, then closes it. When
the lifeline ends without that word, the driver ended abruptly (Ray's core worker exits when the GCS
is gone; or a signal): the last native line, if any, is then the only explanation there is, so the
keeper shows it on its stderr (the user's) in one line, with the log's path; an empty log is
removed. Standard library only, so the keeper starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["keep", "native_output_to_log"]


@contextlib.contextmanager
def native_output_to_log(verbose: bool) -> Iterator[str | None]:
    """Send what native code writes to file descriptor 2 (Ray's core worker and raylet state dumps,
    Arrow's and the AWS SDK's retry messages) and Python's ``sys.stdout`` (where Ray prints the
    raylet's messages) to a log file, ``$TMPDIR/lnstd-native-*.log``, kept
    when the body raises and removed otherwise (also after Ctrl-C); Python's ``sys.stderr`` (our
    one-line messages, the progress bar, ``--traceback``) still reaches the user. With ``verbose``
    nothing is redirected.

    A small keeper process (this module run as a script, :func:`keep`) writes the log; if this
    process ends abruptly (native code exits it, so no Python runs to say why), the keeper shows the
    last native line. Ray is shut down inside, so its teardown is logged too. Yields the log's path
    (None when verbose).
    """
    if verbose:
        yield None
        return
    try:
        user_is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): fd 2 is not the user
        user_is_fd2 = False
    sys.stderr.flush()
    log_fd, path = tempfile.mkstemp(prefix="lnstd-native-", suffix=".log")
    os.close(log_fd)
    out_r, out_w = os.pipe()
    life_r, life_w = os.pipe()  # not inheritable: only this process holds the write end
    # A session of its own: the terminal's Ctrl-C (SIGINT to the foreground process group) is for
    # the driver, which reports it; the keeper goes on copying until the driver's lifeline ends.
    keeper = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), path, str(out_r), str(life_r)],
        pass_fds=(out_r, life_r), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    os.close(out_r)
    os.close(life_r)
    saved = os.dup(2)
    before = sys.stderr
    if user_is_fd2:  # the user's stderr through another descriptor (left open: handlers may hold it)
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    os.dup2(out_w, 2)
    os.close(out_w)
    # Ray's driver prints the raylet's error messages ("(raylet) A worker died ...", with colour
    # codes) on Python's stdout from a thread of its own; a run says what it does on stderr, so its
    # stdout goes to the log as well.
    sys.stdout.flush()
    shown = sys.stdout
    sys.stdout = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
    failed = True
    try:
        yield path
        failed = False
    except KeyboardInterrupt:
        failed = False  # the user stopped the run: nothing to diagnose, no log to keep
        raise
    finally:
        try:
            with contextlib.suppress(Exception):
                if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                    sys.modules["ray"].shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C during Ray's shutdown: stop waiting for it
            pass
        sys.stderr.flush()
        with contextlib.suppress(Exception):
            sys.stdout.close()
        sys.stdout = shown
        os.write(life_w, b"done")  # we finish by ourselves: the keeper need not speak
        os.dup2(saved, 2)
        os.close(saved)
        os.close(life_w)
        with contextlib.suppress(subprocess.TimeoutExpired):
            keeper.wait(timeout=10)
        if user_is_fd2:
            sys.stderr.flush()
            sys.stderr = before
        if not failed or os.path.getsize(path) == 0:
            os.remove(path)


def keep(log_path: str, out_fd: int, life_fd: int) -> None:
    """The keeper process's loop: copy ``out_fd`` into the log until the driver's lifeline ends;
    speak only if the driver went without saying it finished."""
    tail, status = b"", b""
    watched = [out_fd, life_fd]
    with open(log_path, "ab") as log:

        def take(data: bytes) -> None:
            nonlocal tail
            log.write(data)
            log.flush()
            tail = (tail + data)[-8192:]

        while life_fd in watched:
            ready, _, _ = select.select(watched, [], [])
            if out_fd in ready:
                data = os.read(out_fd, 65536)
                if data:
                    take(data)
                else:
                    watched.remove(out_fd)  # every writer is gone
            if life_fd in ready:
                word = os.read(life_fd, 64)
                status += word
                if not word:
                    watched.remove(life_fd)  # the driver is gone
        if out_fd in watched:  # what the driver wrote before it went (its children may hold the pipe)
            os.set_blocking(out_fd, False)
            try:
                while data := os.read(out_fd, 65536):
                    take(data)
            except BlockingIOError:
                pass
    if status:
        return  # the driver finished by itself and reports for itself
    lines = [" ".join(line.split()) for line in tail.decode("utf-8", "replace").splitlines()]
    last = next((line for line in reversed(lines) if line), None)
    if last is None:  # killed from outside (a signal), with nothing native to show
        os.remove(log_path)
        return
    msg = f"lnstd: error: the run ended abruptly; native code's last words: {last[:300]} (all: {log_path})\n"
    os.write(2, msg.encode())


if __name__ == "__main__":
    keep(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
