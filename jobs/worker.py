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
            "lnstd.config": json.dumps(RunConfig(**self.cfg.to_dict()).identity(), sort_keys=True),
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
    def _explain(self, batch: list[Loaded]) -> list[dict[str, Any]]:
        good = [b for b in batch if b.error is None]
        rows: list[dict[str, Any]] = [
            self._error_row(b, m) for b in batch if b.error for m in self.cfg.methods
        ]
        if not good:
            return rows
        t0 = time.perf_counter()
        x = torch.stack([b.tensor for b in good]).to(self.device, non_blocking=True)
        labels = [b.item.label for b in good]
        if self.cfg.topk:
            with torch.no_grad():
                logits = self.model(x)
            k = min(self.cfg.topk, logits.shape[1])
            targets = [t for t in logits.topk(k, dim=1).indices.T]
        elif self.cfg.target == "label":
            targets = [torch.tensor(labels, dtype=torch.long, device=self.device)]
        else:
            targets = [None]
        masks = (
            torch.stack([b.mask for b in good]).to(self.device)
            if all(b.mask is not None for b in good)
            else None
        )
        outs = [self.explainer(x, t) for t in targets]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        per_image_ms = (time.perf_counter() - t0) * 1000 / len(good)
        for out in outs:
            metrics = (
                {m: mask_metrics(h, masks) for m, h in out.heatmaps.items()} if masks is not None else {}
            )
            # The write step: one copy per tensor to host memory.
            heat = {m: h.flatten(1).cpu().numpy() for m, h in out.heatmaps.items()}
            met = {m: {k: v.cpu().numpy() for k, v in d.items()} for m, d in metrics.items()}
            tgt, pred = out.targets.cpu().numpy(), out.predicted.cpu().numpy()
            prob = out.probabilities.cpu().numpy()
            for i, b in enumerate(good):
                for m in self.cfg.methods:
                    gh, gw = self.grids[m]
                    row = {
                        "image_id": b.item.image_id,
                        "source": b.item.uri,
                        "width": b.width,
                        "height": b.height,
                        "model": self.cfg.model,
                        "method": m,
                        "target": int(tgt[i]),
                        "predicted": int(pred[i]),
                        "probability": float(prob[i]),
                        "heatmap": heat[m][i],
                        "grid_h": gh,
                        "grid_w": gw,
                        "label": labels[i],
                        "correct": None if labels[i] is None else bool(pred[i] == labels[i]),
                        "status": "ok",
                        "error": None,
                        "elapsed_ms": per_image_ms,
                    }
                    for name in MASK_METRICS:
                        row[name] = float(met[m][name][i]) if m in met else None
                    if self.cfg.save_png:
                        row["heatmap_png"] = _png(heat[m][i].reshape(gh, gw), b.width, b.height)
                    rows.append(row)
        return rows

    def _error_row(self, b: Loaded, method: str) -> dict[str, Any]:
        return {
            "image_id": b.item.image_id,
            "source": b.item.uri,
            "model": self.cfg.model,
            "method": method,
            "label": b.item.label,
            "status": "error",
            "error": b.error,
        }

    def process(self, shard: int, items: list[Item]) -> dict[str, Any]:
        """Attribute one shard and commit ``heatmaps/part-<shard>.parquet``; idempotent."""
        uri = part_uri(self.cfg.output, shard)
        if storage.exists(uri, self.opts):  # a retried call after the commit: nothing to redo
            return {"shard": shard, "images": len(items), "skipped": True, "ok": 0, "errors": 0}
        rows: list[dict[str, Any]] = []
        for batch in self._batches(items):
            rows.extend(self._explain(batch))
        for r in rows:
            r["shard"] = shard
        table = pa.Table.from_pylist(rows, schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(uri, buf.getvalue(), self.opts)
        errors = {r["image_id"] for r in rows if r["status"] == "error"}
        return {
            "shard": shard,
            "images": len(items),
            "skipped": False,
            "ok": len(items) - len(errors),
            "errors": len(errors),
            "rows": len(rows),
            "peak_rss_mb": peak_rss_mb(),
        }


def _png(heat: np.ndarray, width: int, height: int) -> bytes:
    t = torch.from_numpy(heat)[None]
    img = lnstd.minmax(lnstd.upsample(t, (height, width)))[0].numpy()
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()
