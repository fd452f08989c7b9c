"""The driver's words on the terminal: one line each, never inside the progress bar."""

from __future__ import annotations

import sys

__all__ = ["last_line", "log"]


def log(msg: str) -> None:
    """``lnstd: msg`` on stderr, on a line of its own (above the progress bar, if one is drawn)."""
    from tqdm import tqdm

    tqdm.write(f"lnstd: {msg}", file=sys.stderr)
    sys.stderr.flush()


def last_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (Ray's errors carry a traceback first)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
