"""The test browser launches cleanly: nothing of Debian's launcher script in its log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .jobhelpers import ROOT

pytestmark = pytest.mark.integration  # a real Chromium


def test_chromium_launch_logs_no_shell_errors(tmp_path):
    """Debian's /usr/bin/chromium wrapper breaks on a doubly mounted /dev/shm (`[: ...: unexpected
    operator` on every launch); the browser is started without it, and the page still renders."""
    page = tmp_path / "p.html"
    page.write_text("<!doctype html><title>t</title><p style='width:100px'>hello</p>")
    code = (
        "import sys; from pathlib import Path; from tests.browser import visit\n"
        "v = visit(Path(sys.argv[1]), Path(sys.argv[2]), width=390)\n"
        "print('width', v.scroll_width, v.viewport_width)\n"
    )
    env = {**os.environ, "DEBUG": "pw:browser", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(page), str(tmp_path / "p.png")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "width 390 390" in r.stdout
    log = r.stderr
    assert "<launching>" in log  # the browser's own log was captured
    assert "unexpected operator" not in log and "[err] /usr/bin/chromium:" not in log, log[-2000:]
