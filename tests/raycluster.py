"""A real Ray cluster (``ray.cluster_utils.Cluster``: a GCS, raylets) run from a process of its own.

Tests start clusters through :class:`ClusterProcess`, never in the pytest worker: ``Cluster`` keeps a
native GCS client in the process that starts it, and native Ray state in a test worker can end that
worker without a word (CI saw a worker die twice at the same point of the suite, the first test of a
module whose head had just started after the previous module's head shut down). A process of its own
is also how a user's cluster runs: apart from the job.

Run as ``python -m tests.raycluster HEAD_ARGS_JSON``; it prints one JSON line (the address and the head's
node id), then answers one JSON line per command line on stdin, and shuts the cluster down at end of
input (so also when its parent dies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class ClusterProcess:
    """``ray.cluster_utils.Cluster(initialize_head=True, head_node_args=...)`` in a child process,
    with ``env`` set in its environment (None removes a variable; this process's own is untouched)."""

    def __init__(self, head_node_args: Mapping[str, Any], env: Mapping[str, str | None] | None = None):
        environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in shutdown
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.raycluster", json.dumps(dict(head_node_args))],
            cwd=ROOT, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        started = self._reply()
        self.address: str = started["address"]
        self.head_node_id: str = started["node_id"]

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._log.seek(0)
            code = self._proc.returncode
            raise RuntimeError(f"the Ray cluster process ended (exit {code}): {self._log.read()[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the Ray cluster process: {reply['error']}")
        return reply

    def _call(self, op: str, **args: Any) -> dict:
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def add_node(self, **node_args: Any) -> str:
        """Adds a worker node (``Cluster.add_node``); returns its node id."""
        return self._call("add_node", args=node_args)["node_id"]

    def wait_for_nodes(self) -> None:
        self._call("wait_for_nodes")

    def remove_node(self, node_id: str, allow_graceful: bool = True) -> None:
        """``Cluster.remove_node``; ``allow_graceful=False`` kills its raylet (a lost node)."""
        self._call("remove_node", node_id=node_id, allow_graceful=allow_graceful)

    def shutdown(self) -> None:
        """Every node stopped (the child's ``Cluster.shutdown``), the child gone."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._log.close()

    def __enter__(self) -> ClusterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _serve(head_node_args: dict) -> None:
    replies = os.fdopen(os.dup(1), "w")  # the protocol's own channel: whatever Ray prints goes to the log
    os.dup2(2, 1)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head_node_args)
    nodes = {cluster.head_node.node_id: cluster.head_node}

    def say(reply: dict) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    try:
        say({"address": cluster.address, "node_id": cluster.head_node.node_id})
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "add_node":
                    node = cluster.add_node(**cmd["args"])
                    nodes[node.node_id] = node
                    say({"node_id": node.node_id})
                elif cmd["op"] == "wait_for_nodes":
                    cluster.wait_for_nodes()
                    say({})
                elif cmd["op"] == "remove_node":
                    cluster.remove_node(nodes.pop(cmd["node_id"]), allow_graceful=cmd["allow_graceful"])
                    say({})
                else:
                    say({"error": f"unknown op {cmd['op']!r}"})
            except Exception as exc:  # the parent raises it
                say({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
