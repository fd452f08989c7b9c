"""The attribution actor: one model replica; decodes a shard's images on CPU threads (or the GPU)
while the model computes, and commits each shard as one Parquet file (complete or absent).

Faults of one input stay with that input: an unreadable file, a bad label, a mask of the wrong size,
an image the model fails on each become that image's error row, and the rest of the batch is
explained. Only faults of the shard itself (storage, a model that fails on every image) fail the
shard, which the driver then retries.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lnstd import storage
from lnstd.config import RunConfig
from lnstd.data import Item
from lnstd.errors import ModelError
from lnstd.output import SHARD_COUNTS, Output
from lnstd.plan import Plan
from lnstd.rows import Loaded, RowBuilder
from lnstd.sysinfo import peak_rss_mb

from .lease import Lease
from .records import ReplicaInfo, ShardResult

__all__ = ["ShardWorker"]


class ShardWorker(RowBuilder):
    """Attributes whole shards and commits each as one Parquet file (complete or absent); the model
    side (decode, explain, rows) is :class:`lnstd.rows.RowBuilder`'s."""

    def __init__(self, cfg: dict[str, Any], run_id: str, fence: tuple[str, int] | None = None) -> None:
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        super().__init__(RunConfig(**cfg), run_id)
        self.out = Output(self.cfg.output, self.opts)
        # The driver's lease, seen from here: a commit happens only while the driver's run holds it
        # (``fence``: its token and generation; None only for tests of the worker alone).
        self.lease = Lease.follow(self.out, fence[0], fence[1], ttl=self.cfg.lease_ttl) if fence else None
        if self.lease is not None:  # every write of this actor under its driver's fence
            self.out.fence_with(self.lease.fenced, self.lease.generation, self.cfg.lease_ttl)
        self.plan: Plan | None = None  # read when the first shard comes (the driver commits it first)
        # Decoding threads sized to the actor's CPUs (PIL releases the GIL while it decodes/resizes).
        self.decoders = ThreadPoolExecutor(max(2, self.threads))
        try:
            import ray

            # never start or join a cluster from here: outside an actor there is no node
            self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except Exception:  # not inside Ray (tests of the worker alone)
            self.node_id = ""

    def info(self, probe: str | None = None) -> ReplicaInfo:
        """Where this replica runs (the driver logs it), and whether its node sees the run's storage:
        ``cannot_see`` names what it cannot read (``probe``, a file the driver wrote under the
        output, or the input), else None."""
        import socket

        cannot_see = None
        if probe is not None:
            if not storage.exists(probe, self.opts):
                cannot_see = f"the output {self.cfg.output}"
            elif not self._sees_input():
                cannot_see = f"the input {self.cfg.input}"
        ip = ""
        with contextlib.suppress(Exception):
            import ray

            ip = ray.util.get_node_ip_address()
        return ReplicaInfo(
            os.getpid(), str(self.device), self.node_id, ip or socket.gethostname(), cannot_see
        )

    def _sees_input(self) -> bool:
        uri = self.cfg.input
        if storage.is_s3(uri):
            return True  # the same endpoint and credentials reach it from every node
        path = storage.resolve(uri.split("#", 1)[0] if uri.lower().endswith(".mat") else uri, self.opts)[1]
        return os.path.exists(path)

    def _batches(self, items: list[Item]) -> Iterator[list[Loaded]]:
        """Decoded batches; the next batch decodes on threads while the caller computes."""
        size = self.cfg.batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        pending: list[Future] = [self.decoders.submit(self._load, it) for it in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            nxt = (
                [self.decoders.submit(self._load, it) for it in chunks[k + 1]] if k + 1 < len(chunks) else []
            )
            yield [f.result() for f in pending]
            pending = nxt

    def process(self, shard: int) -> ShardResult:
        """Attribute one shard of the plan (its items read from the plan by this actor) and commit
        ``heatmaps/part-<shard>.parquet``; idempotent. Returns counts only."""
        uri = self.out.part(shard)
        if storage.exists(uri, self.opts):  # a retried call after the commit: nothing to redo
            footer = self.out.footer(shard)
            c = footer.counts if footer else {}
            return ShardResult(shard, c.get("images", 0), c.get("ok", 0), c.get("errors", 0), skipped=True,
                               node_id=self.node_id)  # fmt: skip
        if self.plan is None:
            self.plan = Plan.load(self.out)
            if self.plan is None:
                raise ModelError(f"{self.cfg.output} has no committed plan")
        items = self.plan.read_shard(shard)
        tables: list[pa.Table] = []
        for batch in self._batches(items):
            tables.extend(self._explain(batch, shard))
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        status = table["status"].to_numpy(zero_copy_only=False)
        errors = len(set(table["image_id"].filter(pa.array(status == "error")).to_pylist()))
        # The shard's own counts ride in its footer, so a resumed run can total them cheaply.
        counts = {"images": len(items), "ok": len(items) - errors, "errors": errors}
        meta = {
            **table.schema.metadata,
            SHARD_COUNTS: json.dumps(counts).encode(),
            b"lnstd.node_id": self.node_id.encode(),
            b"lnstd.generation": str(self.out.generation).encode(),
        }
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
        # Published under the driver's fence (Output.write): no takeover can interleave (local), or
        # a delayed publication finds its staged source removed by the new holder (S3); a part that
        # another attempt committed meanwhile is kept, not replaced.
        self.out.write(uri, buf.getvalue(), create_only=True)
        return ShardResult(
            shard, **counts, rows=table.num_rows, peak_rss_mb=peak_rss_mb(), node_id=self.node_id
        )
