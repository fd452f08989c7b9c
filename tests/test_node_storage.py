"""A multi-node run needs storage every node sees. A Ray node whose file system does not hold the
driver's folders (a worker node started in its own mount namespace, with an empty tmpfs over the
test's folder: what a second machine looks like) gets the actor, proves it cannot read the token the
driver wrote under the output, and the run is refused up front: exit 2, one line, nothing attributed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .jobhelpers import ROOT, good_image, model_flags, tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two `ray start` nodes: about a minute

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


def _stop(proc: subprocess.Popen) -> None:
    with_group = proc.pid
    try:
        os.killpg(with_group, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(with_group, signal.SIGKILL)


def test_a_node_that_cannot_see_a_local_output_is_refused_up_front(tmp_path, tmp_path_factory):
    assert _can_unshare(), "this test needs mount namespaces (root, unshare -m), as CI's machine has"
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("model"))  # the model is where every node sees it
    (tmp_path / "in").mkdir()
    for k in range(3):
        (tmp_path / "in" / f"a{k}.png").write_bytes(good_image(2 * k + 1))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    # The other "machine": same binaries, but the test's folder (input and output) is not there.
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs none "{tmp_path}" && exec "{RAY}" start --address={address} --num-cpus=1 --block'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the worker node has joined
            r = subprocess.run(
                [RAY, "status", f"--address={address}"], capture_output=True, text=True, env=env
            )
            if r.returncode == 0 and "1.0 CPU" in r.stdout.replace("0.0/1.0 CPU", "1.0 CPU"):
                break
            time.sleep(2)
        else:
            raise AssertionError(f"the worker node did not join: {r.stdout[-1500:]} {r.stderr[-1500:]}")
        t0 = time.time()
        run = subprocess.run(
            [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output",
             str(tmp_path / "out"), *model_flags(ckpt), "--methods", "gae", "--no-progress",
             "--address", address, "--cpus-per-actor", "1", "--startup-timeout", "120"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
        )  # fmt: skip
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert run.returncode == 2, run.stderr[-3000:]
        assert "cannot read the output" in lines[-1] and "s3://" in lines[-1], lines
        assert len([ln for ln in lines if ln.startswith("lnstd: error")]) == 1
        assert not (tmp_path / "out" / "heatmaps").exists()  # nothing attributed, nowhere
        assert time.time() - t0 < 120
    finally:
        _stop(node)
        _stop(head)
