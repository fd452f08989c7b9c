"""The keeper of ``lnstd run``'s native-output log, run as a script in its own small process.

Usage: ``python _native_log.py LOG OUTPUT_FD LIFELINE_FD``. It copies what arrives on OUTPUT_FD
(the driver's file descriptor 2: Ray's and Arrow's native diagnostics) into LOG. The driver writes
a word on LIFELINE_FD when it finishes by itself, then closes it. When the lifeline ends without
that word, the driver ended abruptly (Ray's core worker exits when the GCS is gone; or a signal):
the last native line, if any, is then the only explanation there is, so it is shown on this
process's stderr (the user's) in one line, with the log's path; an empty log is removed.
Standard library only, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import select
import sys


def main(log_path: str, out_fd: int, life_fd: int) -> None:
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
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
