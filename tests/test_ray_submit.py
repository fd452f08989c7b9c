"""``ray start --head`` + ``ray job submit -- lnstd run ...`` on this machine (slow)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .jobhelpers import ROOT, model_flags, tiny_checkpoint
from .test_job import write_folder

pytestmark = pytest.mark.integration  # Ray, an S3 server or the CLI in a subprocess

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_ray_start_head(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    write_folder(tmp_path / "in", 40)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's token authentication, with a token of this test's own for the cluster and the client.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    port, dash = _free_port(), _free_port()
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "out"
        job = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
             sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output", str(out),
             *model_flags(ckpt), "--methods", "gae,lnstd", "--shard-size", "10", "--no-progress",
             "--cpus-per-actor", "0.5"],
            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout.lower()
        assert (out / "_SUCCESS").exists()
        assert len(list((out / "heatmaps").glob("part-*.parquet"))) == 4
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
