"""The attribution actor: one model replica; decodes a shard's images on CPU threads (or the GPU)
while the model computes, and commits each shard as one Parquet file (complete or absent).

Faults of one input stay with that input: an unreadable file, a bad label, a mask of the wrong size,
an image the model fails on each become that image's error row, and the rest of the batch is
explained. Only faults of the shard itself (storage, a model that fails on every image) fail the
shard, which the driver then retries.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import lnstd
from lnstd import output as layout
from lnstd import storage
from lnstd.data import DecodeError, Item, decode_mask, read_mat_sample
from lnstd.data.decode import jpeg_header
from lnstd.data.preprocess import Geometry, Preprocess
from lnstd.errors import ModelError, one_line
from lnstd.metrics.mask import MASK_METRICS, mask_metrics
from lnstd.sysinfo import peak_rss_mb

from .config import RunConfig

__all__ = ["SCHEMA_FIELDS", "ShardWorker"]

MISSING = "missing at run time"


@dataclass
class Loaded:
    """One decoded input (or the reason it could not be)."""

    item: Item
    tensor: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    geometry: Geometry | None = None
    error: str | None = None
    detail: str | None = None
    raw: bytes | None = None  # JPEG bytes kept for the GPU decoder


class ImageFault(Exception):
    """A fault of one input found while attributing it (the model raised on that image alone)."""


def SCHEMA_FIELDS(heat: pa.DataType) -> list[tuple[str, pa.DataType]]:
    """The row layout of ``heatmaps/part-*.parquet`` (docs/architecture.md lists every column)."""
    return [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crop_box", pa.list_(pa.float32(), 4)),
        ("model", pa.string()),
        ("method", pa.string()),
        ("target", pa.int64()),
        ("predicted", pa.int64()),
        ("probability", pa.float32()),
        ("heatmap", heat),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("label", pa.int64()),
        ("correct", pa.bool_()),
        *[(name, pa.float32()) for name in MASK_METRICS],
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("shard", pa.int32()),
        ("elapsed_ms", pa.float32()),
        ("completeness", pa.float32()),
    ]


class ShardWorker:
    """Attributes whole shards and commits each as one Parquet file (complete or absent)."""

    def __init__(self, cfg: dict[str, Any], run_id: str) -> None:
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        self.cfg = RunConfig(**cfg)
        self.run_id = run_id
        self.opts = storage.StorageOptions.from_env(self.cfg.s3_endpoint)
        cuda = torch.cuda.is_available() and self.cfg.gpus_per_actor > 0
        if self.cfg.decode == "gpu" and not cuda:
            raise ModelError("--decode gpu needs a CUDA GPU on the actor's node, and this one has none")
        self.device = torch.device("cuda" if cuda else "cpu")
        threads = max(1, round(self.cfg.cpus_per_actor))
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        torch.manual_seed(0)  # random-weight models: every replica gets the same weights
        self.model = lnstd.load_model(
            self.cfg.model,
            checkpoint=self.cfg.checkpoint,
            pretrained=self.cfg.pretrained,
            device=self.device,
            **self.cfg.model_args,
        )
        self.explainer = lnstd.Explainer(
            self.model,
            self.cfg.methods,
            precision=self.cfg.precision,
            capture=self.cfg.capture,
            **self.cfg.options,
        )
        self.prep = Preprocess.for_model(self.model, self.cfg.fit)
        h, w = self.prep.size
        probe = self.explainer(torch.zeros(1, 3, h, w, device=self.device))
        self.num_classes = int(probe.logits.shape[1])
        self.grids = {m: tuple(hm.shape[1:]) for m, hm in probe.heatmaps.items()}
        self.schema = self._schema()
        # Decoding threads sized to the actor's CPUs (PIL releases the GIL while it decodes/resizes).
        self.decoders = ThreadPoolExecutor(max(2, threads))
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # not inside Ray (tests of the worker alone)
            self.node_id = ""

    def info(self) -> dict[str, Any]:
        """Where this replica runs (the driver logs it)."""
        return {"pid": os.getpid(), "device": str(self.device), "grids": self.grids, "node_id": self.node_id}

    # --- schema ----------------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        sizes = {h * w for h, w in self.grids.values()}
        # One fixed size when every method shares the grid (Swin lnstd's 7x7 vs 56x56 do not).
        heat = pa.list_(pa.float32(), sizes.pop()) if len(sizes) == 1 else pa.list_(pa.float32())
        fields = SCHEMA_FIELDS(heat)
        if self.cfg.save_png:
            fields.append(("heatmap_png", pa.binary()))
        meta = {
            "lnstd.run_id": self.run_id,
            "lnstd.version": lnstd.__version__,
            "lnstd.config": json.dumps(self.cfg.identity(), sort_keys=True),
            "lnstd.options": json.dumps(self.explainer.options, sort_keys=True),
        }
        return pa.schema(fields, metadata=meta)

    # --- input -----------------------------------------------------------------------------------
    def _load(self, item: Item) -> Loaded:
        """Read, decode and preprocess one input; every fault becomes this input's error."""
        try:
            if item.problem:
                return Loaded(item, error=item.problem)
            if self.cfg.target == "label":
                if item.label is None:
                    return Loaded(item, error="no label (--target label)")
                if not 0 <= item.label < self.num_classes:
                    return Loaded(
                        item,
                        error="label out of range",
                        detail=f"{item.label} (model: {self.num_classes} classes)",
                    )
            if ".mat#" in item.uri:
                arr, mask_arr = read_mat_sample(item.uri)
                tensor, geom = self.prep.from_array(arr)
                return Loaded(item, tensor, self.prep.mask(mask_arr, geom), geom)
            data = storage.read_bytes(item.uri, self.opts)
            header = jpeg_header(data) if self.cfg.decode == "gpu" else None
            if header is not None and header[2]:
                # decoded on the GPU with the whole batch; the geometry needs only the header
                geom = self.prep.geometry(header[0], header[1])
                loaded = Loaded(item, geometry=geom, raw=data)
            else:
                img, geom = self.prep.decode(data)
                loaded = Loaded(item, self.prep.tensor(img, geom), geometry=geom)
            if item.mask_uri:
                loaded.mask = self.prep.mask(decode_mask(storage.read_bytes(item.mask_uri, self.opts)), geom)
            return loaded
        except DecodeError as exc:
            return Loaded(item, error=exc.reason, detail=exc.detail or None)
        except FileNotFoundError:
            return Loaded(item, error=MISSING)
        except (PermissionError, IsADirectoryError) as exc:
            return Loaded(item, error="unreadable", detail=type(exc).__name__)
        except storage.StorageError as exc:
            return Loaded(
                item, error="read failed", detail=one_line(exc, 10_000)[-200:]
            )  # the reason ends it

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

    def _stack(self, good: list[Loaded]) -> torch.Tensor:
        """The batch's inputs on the model's device; CPU-decoded ones cross once, via pinned memory."""
        if self.device.type == "cpu":
            return torch.stack([b.tensor for b in good])
        if all(b.tensor.device.type == "cpu" for b in good):
            return torch.stack([b.tensor for b in good]).pin_memory().to(self.device, non_blocking=True)
        return torch.stack([b.tensor.to(self.device, non_blocking=True) for b in good])

    # --- compute ---------------------------------------------------------------------------------
    def _targets(self, x: torch.Tensor, labels: list[int | None]) -> list[torch.Tensor | None]:
        if self.cfg.topk:
            with torch.no_grad():
                logits = self.model(x)
            return list(logits.topk(min(self.cfg.topk, logits.shape[1]), 1).indices.T)
        if self.cfg.target == "label":
            return [torch.tensor(labels, dtype=torch.long, device=self.device)]
        return [None]

    def _attribute(self, x: torch.Tensor, labels: list[int | None]) -> list[lnstd.Explanation]:
        return [self.explainer(x, t) for t in self._targets(x, labels)]

    def _explain(self, batch: list[Loaded], shard: int) -> list[pa.Table]:
        """Tables of this batch's rows: error rows, then one table per target x method."""
        t0 = time.perf_counter()
        good = [b for b in batch if b.error is None]
        if good and self.cfg.decode == "gpu":
            from lnstd.data.gpu import decode_on_gpu

            decode_on_gpu(good, self.prep, self.device)  # JPEGs in one call; failures per image
            good = [b for b in good if b.error is None]
        outs: list[lnstd.Explanation] = []
        if good:
            x = self._stack(good)
            try:
                outs = self._attribute(x, [b.item.label for b in good])
            except Exception as exc:
                if _device_fault(exc):
                    raise
                # One image may be at fault: explain them one by one and keep the fault with it.
                good, outs = self._one_by_one(good, exc)
        tables = []
        bad = [b for b in batch if b.error is not None]
        if bad:
            rows = [self._error_row(b, m, shard) for b in bad for m in self.cfg.methods]
            tables.append(pa.Table.from_pylist(rows, schema=self.schema))
        if good:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            per_image_ms = (time.perf_counter() - t0) * 1000 / len(batch)
            tables.extend(self._ok_tables(good, outs, shard, per_image_ms))
        return tables

    def _one_by_one(
        self, good: list[Loaded], first: Exception
    ) -> tuple[list[Loaded], list[lnstd.Explanation]]:
        ok: list[Loaded] = []
        results: list[list[lnstd.Explanation]] = []
        for b in good:
            try:
                results.append(self._attribute(self._stack([b]), [b.item.label]))
                ok.append(b)
            except Exception as exc:
                if _device_fault(exc):
                    raise
                b.error, b.detail = (
                    "attribution failed",
                    f"{type(exc).__name__}: {one_line(exc, 160)}",
                )
        if not ok:  # every image fails alike: a fault of the model or the shard, not of one image
            raise first
        outs = [_cat([r[k] for r in results]) for k in range(len(results[0]))]
        return ok, outs

    def _ok_tables(
        self, good: list[Loaded], outs: list[lnstd.Explanation], shard: int, per_image_ms: float
    ) -> list[pa.Table]:
        n = len(good)
        labels = [b.item.label for b in good]
        with_mask = [i for i, b in enumerate(good) if b.mask is not None]
        masks = torch.stack([good[i].mask for i in with_mask]).to(self.device) if with_mask else None
        boxes = np.array([b.geometry.box for b in good], dtype=np.float32)
        common = {
            "image_id": pa.array([b.item.image_id for b in good], pa.string()),
            "source": pa.array([b.item.uri for b in good], pa.string()),
            "width": pa.array([b.geometry.width for b in good], pa.int32()),
            "height": pa.array([b.geometry.height for b in good], pa.int32()),
            "crop_box": pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4),
            "model": pa.array([self.cfg.model] * n, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "status": pa.array(["ok"] * n, pa.string()),
            "error": pa.nulls(n, pa.string()),
            "error_detail": pa.nulls(n, pa.string()),
            "shard": pa.array(np.full(n, shard, np.int32)),
            "elapsed_ms": pa.array(np.full(n, per_image_ms, np.float32)),
        }
        has_label = np.array([lb is not None for lb in labels])
        label_arr = np.array([-1 if lb is None else lb for lb in labels])
        heat_type = self.schema.field("heatmap").type
        tables = []
        for out in outs:
            # The write step: each tensor crosses to host memory once, for the whole batch.
            pred = out.predicted.cpu().numpy()
            cols = {
                **common,
                "target": pa.array(out.targets.cpu().numpy().astype(np.int64)),
                "predicted": pa.array(pred.astype(np.int64)),
                "probability": pa.array(out.probabilities.cpu().numpy().astype(np.float32)),
                "correct": pa.array(pred == label_arr, mask=~has_label),
            }
            for m, h in out.heatmaps.items():
                gh, gw = self.grids[m]
                scores = mask_metrics(h[with_mask], masks) if masks is not None else {}
                scores = {k: v.cpu().numpy() for k, v in scores.items()}
                heat = h.flatten(1).cpu().numpy().astype(np.float32)
                values = pa.array(heat.ravel())
                if pa.types.is_fixed_size_list(heat_type):
                    heat_col = pa.FixedSizeListArray.from_arrays(values, gh * gw)
                else:
                    heat_col = pa.ListArray.from_arrays(
                        pa.array(np.arange(n + 1, dtype=np.int32) * gh * gw), values
                    )
                table = {
                    **cols,
                    "method": pa.array([m] * n, pa.string()),
                    "heatmap": heat_col,
                    "grid_h": pa.array(np.full(n, gh, np.int32)),
                    "grid_w": pa.array(np.full(n, gw, np.int32)),
                    "completeness": pa.array(out.completeness[m].cpu().numpy())
                    if m in out.completeness
                    else pa.nulls(n, pa.float32()),
                }
                for name in MASK_METRICS:
                    full = np.full(n, np.nan, np.float32)
                    if name in scores:
                        full[with_mask] = scores[name]
                    table[name] = pa.array(full, mask=np.isnan(full))
                if self.cfg.save_png:
                    table["heatmap_png"] = pa.array(
                        [_png(heat[i].reshape(gh, gw), b.geometry) for i, b in enumerate(good)], pa.binary()
                    )
                tables.append(pa.table(table).select(self.schema.names).cast(self.schema))
        return tables

    def _error_row(self, b: Loaded, method: str, shard: int) -> dict[str, Any]:
        return {
            "image_id": b.item.image_id,
            "source": b.item.uri,
            "model": self.cfg.model,
            "method": method,
            "label": b.item.label,
            "status": "error",
            "error": b.error,
            "error_detail": b.detail,
            "shard": shard,
        }

    def process(self, shard: int, items: list[Item]) -> dict[str, Any]:
        """Attribute one shard and commit ``heatmaps/part-<shard>.parquet``; idempotent."""
        uri = layout.part_uri(self.cfg.output, shard)
        if storage.exists(uri, self.opts):  # a retried call after the commit: nothing to redo
            counts = layout.shard_counts(self.cfg.output, shard, self.opts)
            return {"shard": shard, "skipped": True, "images": len(items), "ok": 0, "errors": 0, **counts,
                    "node_id": self.node_id}  # fmt: skip
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
            layout.SHARD_COUNTS: json.dumps(counts).encode(),
            b"lnstd.node_id": self.node_id.encode(),
        }
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
        storage.write_bytes(uri, buf.getvalue(), self.opts)
        return {
            "shard": shard,
            "skipped": False,
            **counts,
            "rows": table.num_rows,
            "peak_rss_mb": peak_rss_mb(),
            "node_id": self.node_id,
        }


def _cat(parts: list[lnstd.Explanation]) -> lnstd.Explanation:
    return lnstd.Explanation(
        heatmaps={m: torch.cat([p.heatmaps[m] for p in parts]) for m in parts[0].heatmaps},
        logits=torch.cat([p.logits for p in parts]),
        targets=torch.cat([p.targets for p in parts]),
        predicted=torch.cat([p.predicted for p in parts]),
        probabilities=torch.cat([p.probabilities for p in parts]),
        completeness={m: torch.cat([p.completeness[m] for p in parts]) for m in parts[0].completeness},
    )


def _device_fault(exc: BaseException) -> bool:
    """Errors of the device or process, not of one image: the shard fails and is retried."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError) or "CUDA error" in text or "NCCL" in text or "device-side assert" in text
    )


def _png(heat: np.ndarray, geom: Geometry) -> bytes:
    """The heatmap over the original image: 8-bit relevance, alpha 0 where the input did not reach
    (outside the centre crop)."""
    m = Preprocess.heat_to_image(torch.from_numpy(heat), geom)
    inside = ~np.isnan(m)
    gray = np.where(inside, np.round(np.nan_to_num(m) * 255), 0).astype(np.uint8)
    alpha = (inside * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(buf, format="PNG")
    return buf.getvalue()
