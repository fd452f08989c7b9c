"""The attribution actor: one model replica; decodes shards on CPU threads while the model runs."""

from __future__ import annotations

import io
import json
import os
import time
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
from lnstd import storage
from lnstd.data import DecodeError, Item, decode_image, decode_mask, read_mat_sample
from lnstd.metrics.mask import MASK_METRICS, mask_metrics
from lnstd.models import input_size
from lnstd.sysinfo import peak_rss_mb

from .config import RunConfig

__all__ = ["ShardWorker", "part_uri"]


def part_uri(output: str, shard: int) -> str:
    return storage.join(output, "heatmaps", f"part-{shard:05d}.parquet")


@dataclass
class Loaded:
    """One decoded input (or the reason it could not be)."""

    item: Item
    tensor: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


class ShardWorker:
    """Attributes whole shards and commits each as one Parquet file (complete or absent)."""

    def __init__(self, cfg: dict[str, Any], run_id: str) -> None:
        self.cfg = RunConfig(**cfg)
        self.run_id = run_id
        self.opts = storage.StorageOptions.from_env(self.cfg.s3_endpoint)
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and self.cfg.gpus_per_actor > 0 else "cpu"
        )
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, round(self.cfg.cpus_per_actor)))
        torch.manual_seed(0)  # random-weight models: every replica gets the same weights
        self.model = lnstd.load_model(
            self.cfg.model,
            checkpoint=self.cfg.checkpoint,
            pretrained=self.cfg.pretrained,
            device=self.device,
            **self.cfg.model_args,
        )
        self.explainer = lnstd.Explainer(
            self.model, self.cfg.methods, precision=self.cfg.precision, **self.cfg.options
        )
        self.transform = lnstd.transform_for(self.model, self.cfg.fit)
        self.input_size = input_size(self.model)
        probe = self.explainer(torch.zeros(1, 3, *self.input_size, device=self.device))
        self.grids = {m: tuple(h.shape[1:]) for m, h in probe.heatmaps.items()}
        self.schema = self._schema()
        self.decoders = ThreadPoolExecutor(max(2, int(self.cfg.cpus_per_actor) * 2))

    def info(self) -> dict[str, Any]:
        """Where this replica runs (the driver logs it)."""
        return {"pid": os.getpid(), "device": str(self.device), "grids": self.grids}

    # --- schema ----------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        sizes = {h * w for h, w in self.grids.values()}
        # One fixed size when every method shares the grid (Swin lnstd's 7x7 vs 56x56 do not).
        heat = pa.list_(pa.float32(), sizes.pop()) if len(sizes) == 1 else pa.list_(pa.float32())
        fields = [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
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
            ("shard", pa.int32()),
            ("elapsed_ms", pa.float32()),
        ]
        if self.cfg.save_png:
            fields.append(("heatmap_png", pa.binary()))
        meta = {
            "lnstd.run_id": self.run_id,
            "lnstd.version": lnstd.__version__,
            "lnstd.config": json.dumps(self.cfg.identity(), sort_keys=True),
        }
        return pa.schema(fields, metadata=meta)

    # --- input -----------------------------------------------------------------------------
    def _load(self, item: Item) -> Loaded:
        try:
            if ".mat#" in item.uri:
                arr, mask_arr = read_mat_sample(item.uri)
                img, w, h = Image.fromarray(arr, "RGB"), arr.shape[1], arr.shape[0]
            else:
                data = storage.read_bytes(item.uri, self.opts)
                img, w, h = decode_image(data, min_size=(self.input_size[1], self.input_size[0]))
                mask_arr = (
                    decode_mask(storage.read_bytes(item.mask_uri, self.opts)) if item.mask_uri else None
                )
            tensor = self.transform(img)
            mask = None
            if mask_arr is not None:
                m = Image.fromarray(mask_arr.astype(np.uint8) * 255).resize(
                    (self.input_size[1], self.input_size[0]), Image.NEAREST
                )
                mask = torch.from_numpy(np.asarray(m) > 0)
            if self.cfg.target == "label" and item.label is None:
                return Loaded(item, error="--target label but this image has no label")
            return Loaded(item, tensor, mask, w, h)
        except DecodeError as exc:
            return Loaded(item, error=str(exc))
        except FileNotFoundError as exc:
            return Loaded(item, error=f"not found: {exc}")
        except OSError as exc:
            return Loaded(item, error=f"read failed: {exc}")

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

    # --- compute ---------------------------------------------------------------------------
    def _explain(self, batch: list[Loaded], shard: int) -> list[pa.Table]:
        """Tables of this batch's rows: error rows, then one table per target x method."""
        bad = [b for b in batch if b.error is not None]
        good = [b for b in batch if b.error is None]
        tables = []
        if bad:
            rows = [self._error_row(b, m, shard) for b in bad for m in self.cfg.methods]
            tables.append(pa.Table.from_pylist(rows, schema=self.schema))
        if not good:
            return tables
        t0 = time.perf_counter()
        x = torch.stack([b.tensor for b in good]).to(self.device, non_blocking=True)
        labels = [b.item.label for b in good]
        if self.cfg.topk:
            with torch.no_grad():
                logits = self.model(x)
            targets: list[torch.Tensor | None] = list(
                logits.topk(min(self.cfg.topk, logits.shape[1]), 1).indices.T
            )
        elif self.cfg.target == "label":
            targets = [torch.tensor(labels, dtype=torch.long, device=self.device)]
        else:
            targets = [None]
        with_mask = [i for i, b in enumerate(good) if b.mask is not None]
        masks = torch.stack([good[i].mask for i in with_mask]).to(self.device) if with_mask else None
        outs = [self.explainer(x, t) for t in targets]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        n = len(good)
        per_image_ms = (time.perf_counter() - t0) * 1000 / n
        common = {
            "image_id": pa.array([b.item.image_id for b in good], pa.string()),
            "source": pa.array([b.item.uri for b in good], pa.string()),
            "width": pa.array([b.width for b in good], pa.int32()),
            "height": pa.array([b.height for b in good], pa.int32()),
            "model": pa.array([self.cfg.model] * n, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "status": pa.array(["ok"] * n, pa.string()),
            "error": pa.nulls(n, pa.string()),
            "shard": pa.array(np.full(n, shard, np.int32)),
            "elapsed_ms": pa.array(np.full(n, per_image_ms, np.float32)),
        }
        has_label = np.array([lb is not None for lb in labels])
        label_arr = np.array([-1 if lb is None else lb for lb in labels])
        heat_type = self.schema.field("heatmap").type
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
                }
                scores = mask_metrics(h[with_mask], masks) if masks is not None else {}
                for name in MASK_METRICS:
                    full = np.full(n, np.nan, np.float32)
                    if name in scores:
                        full[with_mask] = scores[name].cpu().numpy()
                    table[name] = pa.array(full, mask=np.isnan(full))
                if self.cfg.save_png:
                    table["heatmap_png"] = pa.array(
                        [_png(heat[i].reshape(gh, gw), b.width, b.height) for i, b in enumerate(good)],
                        pa.binary(),
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
            "shard": shard,
        }

    def process(self, shard: int, items: list[Item]) -> dict[str, Any]:
        """Attribute one shard and commit ``heatmaps/part-<shard>.parquet``; idempotent."""
        uri = part_uri(self.cfg.output, shard)
        if storage.exists(uri, self.opts):  # a retried call after the commit: nothing to redo
            return {"shard": shard, "images": len(items), "skipped": True, "ok": 0, "errors": 0}
        tables: list[pa.Table] = []
        for batch in self._batches(items):
            tables.extend(self._explain(batch, shard))
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        buf = io.BytesIO()
        status = table["status"].to_numpy(zero_copy_only=False)
        errors = len(set(table["image_id"].filter(pa.array(status == "error")).to_pylist()))
        # The shard's own counts ride in its footer, so a resumed run can total them cheaply.
        counts = {"images": len(items), "ok": len(items) - errors, "errors": errors}
        meta = {**table.schema.metadata, b"lnstd.shard_counts": json.dumps(counts).encode()}
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
        storage.write_bytes(uri, buf.getvalue(), self.opts)
        return {
            "shard": shard,
            "images": len(items),
            "skipped": False,
            "ok": len(items) - errors,
            "errors": errors,
            "rows": table.num_rows,
            "peak_rss_mb": peak_rss_mb(),
        }


def _png(heat: np.ndarray, width: int, height: int) -> bytes:
    t = torch.from_numpy(heat)[None]
    img = lnstd.minmax(lnstd.upsample(t, (height, width)))[0].numpy()
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()
