"""The model side of the heatmap rows: one model replica that decodes and preprocesses an input,
explains a batch and builds its rows (``lnstd/output.py: row_fields``). The job's actor
(``lnstd.jobs.worker.ShardWorker``) and the Ray Data building block (``lnstd.ray.Attributor``) are
both this class, so their rows are the same for the same images.

Faults of one input stay with that input: an unreadable file, a bad label, a mask of the wrong size,
a file larger than the decode limit (refused from its size and header, before it is read), an
image whose decoding runs out of memory, an image the model fails on each become that image's
error row, and the rest of the batch is explained. Only faults of the batch itself (a model that
fails on every image, the device) raise.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

import lnstd

from . import output as layout
from . import storage
from .data import DecodeError, Item, decode_mask, mat_ref, read_mat_sample
from .data.decode import jpeg_header
from .data.preprocess import Geometry, Preprocess
from .data.read import read_image
from .errors import ModelError, one_line
from .metrics.mask import MASK_METRICS, mask_metrics
from .metrics.registry import FAITHFULNESS_CURVES, FAITHFULNESS_METRICS

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = ["MISSING", "OUT_OF_MEMORY", "Loaded", "RowBuilder"]

MISSING = "missing at run time"
OUT_OF_MEMORY = "out of memory"


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


class RowBuilder:
    """One model replica and the rows it makes (the model-side half of the job's actor)."""

    def __init__(self, cfg: RunConfig, run_id: str) -> None:
        self.cfg = cfg
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
        self.prep = Preprocess.for_model(self.model, self.cfg.fit, max_pixels=self.cfg.max_image_pixels)
        h, w = self.prep.size
        probe = self.explainer(torch.zeros(1, 3, h, w, device=self.device))
        self.num_classes = int(probe.logits.shape[1])
        self.grids = {m: tuple(hm.shape[1:]) for m, hm in probe.heatmaps.items()}
        self.schema = self._schema()
        self.threads = threads

    # --- schema ----------------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        sizes = {h * w for h, w in self.grids.values()}
        # One fixed size when every method shares the grid (Swin lnstd's 7x7 vs 56x56 do not).
        heat = pa.list_(pa.float32(), sizes.pop()) if len(sizes) == 1 else pa.list_(pa.float32())
        fields = layout.row_fields(heat)
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
    def _load(self, item: Item, data: bytes | np.ndarray | None = None) -> Loaded:
        """Read (unless its bytes or decoded RGB pixels are given), decode and preprocess one input;
        every fault becomes this input's error."""
        try:
            if item.problem:
                return Loaded(item, error=item.problem)
            if self.cfg.targets.kind == "label":
                if item.label is None:
                    return Loaded(item, error="no label (--target label)")
                if not 0 <= item.label < self.num_classes:
                    return Loaded(
                        item,
                        error="label out of range",
                        detail=f"{item.label} (model: {self.num_classes} classes)",
                    )
            if isinstance(data, np.ndarray):  # decoded already (Ray Data's read_images)
                if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
                    raise DecodeError("not an RGB image", f"array {data.dtype} {data.shape}")
                tensor, geom = self.prep.from_array(np.ascontiguousarray(data))
                return Loaded(item, tensor, geometry=geom)
            if mat_ref(item.uri):
                arr, mask_arr = read_mat_sample(item.uri)
                tensor, geom = self.prep.from_array(arr)
                return Loaded(item, tensor, self.prep.mask(mask_arr, geom), geom)
            data = read_image(item.uri, self.opts, self.prep.max_pixels) if data is None else data
            header = jpeg_header(data, self.prep.max_pixels) if self.cfg.decode == "gpu" else None
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
        except MemoryError:  # this image's allocation failed: the others' may not (never the shard's)
            return Loaded(
                item, error=OUT_OF_MEMORY, detail="reading or decoding it needed more memory than was free"
            )
        except FileNotFoundError:
            return Loaded(item, error=MISSING)
        except (PermissionError, IsADirectoryError) as exc:
            return Loaded(item, error="unreadable", detail=type(exc).__name__)
        except storage.NotRegularFileError:
            return Loaded(item, error=storage.NotRegularFileError.reason)
        except storage.StorageError as exc:
            return Loaded(
                item, error="read failed", detail=one_line(exc, 10_000)[-200:]
            )  # the reason ends it
        except (OSError, KeyError, ValueError) as exc:  # h5py's and other readers' faults of this file
            return Loaded(item, error="unreadable", detail=f"{type(exc).__name__}: {one_line(exc, 160)}")

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
        if self.cfg.targets.kind == "label":
            return [torch.tensor(labels, dtype=torch.long, device=self.device)]
        return [None]

    def _attribute(self, x: torch.Tensor, labels: list[int | None]) -> list[lnstd.Explanation]:
        return [self.explainer(x, t) for t in self._targets(x, labels)]

    def _explain(self, batch: list[Loaded], shard: int) -> list[pa.Table]:
        """Tables of this batch's rows: error rows, then one table per target x method."""
        good = [b for b in batch if b.error is None]
        if good and self.cfg.decode == "gpu":
            from lnstd.data.gpu import decode_on_gpu

            decode_on_gpu(good, self.prep, self.device)  # JPEGs in one call; failures per image
            good = [b for b in good if b.error is None]
        outs: list[lnstd.Explanation] = []
        if good:
            x = self._stack(good)
            try:
                outs = self._fitting(x, [b.item.label for b in good])
            except Exception as exc:
                if _device_fault(exc) or _out_of_memory(exc):
                    raise
                # One image may be at fault: explain them one by one and keep the fault with it.
                good, outs = self._one_by_one(good, exc)
        tables = []
        bad = [b for b in batch if b.error is not None]
        if bad:
            rows = [self._error_row(b, m, shard) for b in bad for m in self.cfg.methods]
            tables.append(pa.Table.from_pylist(rows, schema=self.schema))
        if good:
            tables.extend(self._ok_tables(good, outs, shard))
        return tables

    def _fitting(self, x: torch.Tensor, labels: list[int | None]) -> list[lnstd.Explanation]:
        """Explain ``x``; when the device runs out of memory, in halves (down to one image, whose
        out-of-memory error then fails the shard with that reason)."""
        try:
            return self._attribute(x, labels)
        except Exception as exc:
            if not _out_of_memory(exc) or len(x) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = (len(x) + 1) // 2
        parts = [self._fitting(x[:half], labels[:half]), self._fitting(x[half:], labels[half:])]
        return [_cat([p[k] for p in parts]) for k in range(len(parts[0]))]

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
                if _device_fault(exc) or _out_of_memory(exc):
                    raise
                b.error, b.detail = (
                    "attribution failed",
                    f"{type(exc).__name__}: {one_line(exc, 160)}",
                )
        if not ok and len(good) > 1:  # every image fails alike: a fault of the model, not of one image
            raise first
        if not ok:  # a batch of one image that the model fails on: that image's error row
            return [], []
        outs = [_cat([r[k] for r in results]) for k in range(len(results[0]))]
        return ok, outs

    def _ok_tables(self, good: list[Loaded], outs: list[lnstd.Explanation], shard: int) -> list[pa.Table]:
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
        }
        has_label = np.array([lb is not None for lb in labels])
        label_arr = np.array([-1 if lb is None else lb for lb in labels])
        heat_type = self.schema.field("heatmap").type
        x = self._stack(good) if self.cfg.faithfulness else None
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
                if pa.types.is_fixed_size_list(heat_type):
                    heat_col = pa.FixedSizeListArray.from_arrays(pa.array(heat.ravel()), gh * gw)
                else:
                    heat_col = _list_rows(heat)
                table = {
                    **cols,
                    "method": pa.array([m] * n, pa.string()),
                    # each method's own time per image (Explanation.elapsed_ms), not the batch's
                    "elapsed_ms": pa.array(np.full(n, out.elapsed_ms[m] / n, np.float32)),
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
                faithful = self._faithfulness(x, h, out.targets) if x is not None else {}
                for name in FAITHFULNESS_METRICS:
                    table[name] = pa.array(faithful[name]) if name in faithful else pa.nulls(n, pa.float32())
                for name in FAITHFULNESS_CURVES:
                    curve = faithful.get(name)
                    table[name] = (
                        _list_rows(curve) if curve is not None else pa.nulls(n, pa.list_(pa.float32()))
                    )
                if self.cfg.save_png:
                    table["heatmap_png"] = pa.array(
                        [_png(heat[i].reshape(gh, gw), b.geometry) for i, b in enumerate(good)], pa.binary()
                    )
                tables.append(pa.table(table).select(self.schema.names).cast(self.schema))
        return tables

    def _faithfulness(
        self, x: torch.Tensor, heat: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """The ``--faithfulness`` columns of one method's maps of the batch ``x`` (figures (n,) and
        curves (n, points)), in the model's precision, one forward per ``--batch-size`` step images
        (lnstd/metrics/faithfulness.py)."""
        from .explainer import DTYPES
        from .metrics.faithfulness import faithfulness

        scores = faithfulness(
            self.model, x, heat, targets, metrics=self.cfg.faithfulness, chunk=self.cfg.batch_size,
            dtype=DTYPES[self.cfg.precision], curves=True,
        )  # fmt: skip
        return {k: v.cpu().numpy().astype(np.float32) for k, v in scores.items()}

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


def _cat(parts: list[lnstd.Explanation]) -> lnstd.Explanation:
    return lnstd.Explanation(
        heatmaps={m: torch.cat([p.heatmaps[m] for p in parts]) for m in parts[0].heatmaps},
        logits=torch.cat([p.logits for p in parts]),
        targets=torch.cat([p.targets for p in parts]),
        predicted=torch.cat([p.predicted for p in parts]),
        probabilities=torch.cat([p.probabilities for p in parts]),
        elapsed_ms={m: sum(p.elapsed_ms[m] for p in parts) for m in parts[0].heatmaps},
        completeness={m: torch.cat([p.completeness[m] for p in parts]) for m in parts[0].completeness},
    )


def _device_fault(exc: BaseException) -> bool:
    """Errors of the device or the process, not of one image: the shard fails and is retried."""
    accel = getattr(torch, "AcceleratorError", None)  # CUDA errors (torch >= 2.8)
    if isinstance(exc, MemoryError) or (accel is not None and isinstance(exc, accel)):
        return True
    text = str(exc)  # older torch raises a plain RuntimeError for these
    return "CUDA error" in text or "NCCL" in text or "device-side assert" in text


def _out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory (``torch.OutOfMemoryError``; CUDA, or another accelerator)."""
    return isinstance(exc, torch.OutOfMemoryError)


def _list_rows(a: np.ndarray) -> pa.ListArray:
    """The rows of a 2-D array as a list<float32> column (one list per row)."""
    return pa.ListArray.from_arrays(
        pa.array(np.arange(len(a) + 1, dtype=np.int32) * a.shape[1]), pa.array(a.ravel())
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
