"""``lnstd aggregate``: counts, errors, and per-method / per-class statistics of every metric column.

Reads ``heatmaps/`` of a run's output (local or S3) and writes ``_aggregate/`` next to it:
``summary.csv`` (method x metric), ``per_class.csv`` (method x class x metric) and ``counts.json``,
and where the model looks (lnstd/looks.py: ``where_classes.csv``, ``where/part-NNNNN.csv``).

It streams: record batches of only the columns it needs (never the heatmaps), folded into running
per-group figures (count, mean and standard deviation by Chan's parallel update, min, max, and for
the per-method table a histogram median), so its memory grows with the number of groups (methods x
classes x metrics), never with the number of rows. Image counts come from each shard's footer.
benchmarks/bench_scale.py measures its memory and rows/s against N.

The median (``summary.csv`` only) is read from a 16,384-bin histogram over ``asinh(x / 1e-3)``:
the mean of the values in the bin that holds the middle value, so within 0.35% (relative; 1e-6
absolute near 0) of a value between the two middle order statistics, and exact when that bin holds
a single value (e.g. 0/1 columns).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import storage
from .errors import OutputError
from .metrics.registry import column_metrics, higher_is_better
from .output import AGGREGATE, HEATMAPS, SHARD_COUNTS, Output

__all__ = ["aggregate", "describe", "format_table", "heatmap_dataset", "plural"]
BATCH_ROWS = 1 << 17
_BINS = 16384
_SCALE = 1e-3
_UMAX = float(np.arcsinh(1e12))  # |x| up to 1e9


def heatmap_dataset(output: str, opts: storage.StorageOptions) -> pads.Dataset:
    """The heatmap rows of a run's output as a pyarrow dataset; a clear error if there are none."""
    uri = Output(output, opts).path(HEATMAPS)
    fs, path = storage.resolve(uri, opts)
    if fs.get_file_info(path).type != storage.pafs.FileType.Directory and not storage.list_names(uri, opts):
        raise OutputError(
            f"{output}: no lnstd output here (no {HEATMAPS}/ folder); give the --output of a run"
        )
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    if not ds.files:
        raise OutputError(f"{output}: the run has committed no shard yet (no {HEATMAPS}/part-*.parquet)")
    return ds


def _footers(ds: pads.Dataset) -> tuple[dict[str, int], bool]:
    """(images, ok and error images summed from the shards' footers; whether any row has a label).
    A part without counts (written by another tool) is counted from its own rows."""
    total = {"images": 0, "ok": 0, "errors": 0}
    labelled = False
    for path in ds.files:
        with ds.filesystem.open_input_file(path) as f:
            meta = pq.read_metadata(f)
        counts = json.loads((meta.metadata or {}).get(SHARD_COUNTS, b"{}"))
        if not counts:
            t = pq.read_table(path, filesystem=ds.filesystem, columns=["image_id", "status"])
            ids = pc.unique(t["image_id"])
            bad = pc.unique(t.filter(pc.equal(t["status"], "error"))["image_id"])
            counts = {"images": len(ids), "ok": len(ids) - len(bad), "errors": len(bad)}
        for k in total:
            total[k] += int(counts.get(k, 0))
        if not labelled and "label" in meta.schema.names:
            col = meta.schema.names.index("label")
            for g in range(meta.num_row_groups):
                st = meta.row_group(g).column(col).statistics
                if st is None or not st.has_null_count or st.null_count < meta.row_group(g).num_rows:
                    labelled = True
                    break
    return total, labelled


class _Groups:
    """Running count / mean / M2 / min / max per (group, metric), grown as groups appear."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.ids: dict[Any, int] = {}  # key (method code, or code << 40 | class) -> group
        self._lut = np.full((0, 0), -1, np.int64)
        self.n = np.zeros((0, k))
        self.mean = np.zeros((0, k))
        self.m2 = np.zeros((0, k))
        self.lo = np.zeros((0, k))
        self.hi = np.zeros((0, k))

    def index(self, code: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray:
        """Global group ids of rows keyed by method code (and class); new keys get new groups.
        A dense lookup table (methods x classes) maps keys without sorting the rows."""
        width = 1
        if cls is not None:
            lo = int(cls.min()) if len(cls) else 0
            width = int(cls.max()) + 1 if len(cls) else 1
            if lo < 0 or width > 1 << 22:  # unusual class values: sort instead of a table
                uniq, inv = np.unique(code * (1 << 40) + cls, return_inverse=True)
                return self._ids(uniq)[inv.reshape(-1)]
        rows = int(code.max()) + 1 if len(code) else 0
        if self._lut.shape[0] < rows or self._lut.shape[1] < width:
            grown = np.full((max(rows, self._lut.shape[0]), max(width, self._lut.shape[1])), -1, np.int64)
            grown[: self._lut.shape[0], : self._lut.shape[1]] = self._lut
            self._lut = grown
        flat_keys = code * self._lut.shape[1] + (cls if cls is not None else 0)
        gid = self._lut.reshape(-1)[flat_keys]
        new = gid < 0
        if new.any():
            fresh = np.unique(flat_keys[new])
            ids = self._ids(
                fresh // self._lut.shape[1] * (1 << 40) + fresh % self._lut.shape[1]
                if cls is not None
                else fresh
            )
            self._lut.reshape(-1)[fresh] = ids
            gid = self._lut.reshape(-1)[flat_keys]
        return gid

    def _ids(self, keys: np.ndarray) -> np.ndarray:
        gids = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys.tolist()):
            g = self.ids.get(key)
            if g is None:
                g = self.ids[key] = len(self.ids)
            gids[i] = g
        grow = len(self.ids) - len(self.n)
        if grow > 0:
            z = np.zeros((grow, self.k))
            self.n, self.mean, self.m2 = (np.vstack([a, z]) for a in (self.n, self.mean, self.m2))
            self.lo = np.vstack([self.lo, np.full((grow, self.k), np.inf)])
            self.hi = np.vstack([self.hi, np.full((grow, self.k), -np.inf)])
        return gids

    def update(self, gid: np.ndarray, k: int, v: np.ndarray) -> None:
        """Fold the values ``v`` of metric ``k`` (rows' groups ``gid``) in (Chan et al.'s update)."""
        size = len(self.n)
        nb = np.bincount(gid, minlength=size).astype(np.float64)
        has = nb > 0
        mb = np.zeros(size)
        mb[has] = np.bincount(gid, v, size)[has] / nb[has]
        m2b = np.bincount(gid, (v - mb[gid]) ** 2, size)
        na = self.n[:, k]
        n = na + nb
        delta = mb - self.mean[:, k]
        safe = np.where(n > 0, n, 1)
        self.mean[:, k] += np.where(has, delta * nb / safe, 0.0)
        self.m2[:, k] += m2b + np.where(has, delta**2 * na * nb / safe, 0.0)
        self.n[:, k] = n
        np.minimum.at(self.lo[:, k], gid, v)
        np.maximum.at(self.hi[:, k], gid, v)


class _Fold:
    """The running figures of one pass over the rows: row counts and error reasons per method, and
    per method and per (method, class) the moments and histograms of every metric column."""

    def __init__(self, metrics: list[str], class_col: str) -> None:
        self.metrics, self.class_col, self.k = metrics, class_col, len(metrics)
        self.methods: dict[str, int] = {}
        self.rows = np.zeros(0, np.int64)
        self.reasons: dict[tuple[int, str], int] = {}
        self.by_method, self.by_class = _Groups(self.k), _Groups(self.k)
        self.hist = np.zeros((0, self.k, _BINS))
        self.hsum = np.zeros((0, self.k, _BINS))

    def add(self, batch: pa.RecordBatch) -> None:
        code = _codes(batch.column("method"), self.methods)
        if len(self.methods) > len(self.rows):
            grow = len(self.methods) - len(self.rows)
            self.rows = np.concatenate([self.rows, np.zeros(grow, np.int64)])
            self.hist = np.concatenate([self.hist, np.zeros((grow, self.k, _BINS))])
            self.hsum = np.concatenate([self.hsum, np.zeros((grow, self.k, _BINS))])
        self.rows += np.bincount(code, minlength=len(self.rows))
        status = batch.column("status")
        bad = pc.equal(status, "error").to_numpy(zero_copy_only=False)
        if bad.any():
            errs = batch.column("error").filter(pa.array(bad)).to_pylist()
            for c, e in zip(code[bad].tolist(), errs, strict=True):
                self.reasons[(c, e)] = self.reasons.get((c, e), 0) + 1
        ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
        if ok.any() and self.k:
            self._add_metrics(batch, code, ok)

    def _add_metrics(self, batch: pa.RecordBatch, code: np.ndarray, ok: np.ndarray) -> None:
        code_ok = code[ok]
        cls_all = _floats(batch.column(self.class_col))[ok]  # NaN where a row has no class
        has_cls = ~np.isnan(cls_all)
        gm = self.by_method.index(code_ok)
        gc = self.by_class.index(code_ok[has_cls], cls_all[has_cls].astype(np.int64))
        size = len(self.hist) * _BINS
        for j, m in enumerate(self.metrics):
            v = _floats(batch.column(m))[ok]
            valid = ~np.isnan(v)
            if not valid.any():
                continue
            self.by_method.update(gm[valid], j, v[valid])
            both = valid[has_cls]
            self.by_class.update(gc[both], j, v[has_cls][both])
            flat = code_ok[valid] * _BINS + _bin(v[valid])
            self.hist[:, j, :] += np.bincount(flat, minlength=size).reshape(len(self.hist), _BINS)
            self.hsum[:, j, :] += np.bincount(flat, v[valid], minlength=size).reshape(len(self.hist), _BINS)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(per method, per method and class)."""
        names = {c: m for m, c in self.methods.items()}
        per_method = _table(
            self.by_method, self.metrics, ["method"], lambda key: (names[key],), self.hist, self.hsum
        )
        per_class = _table(
            self.by_class,
            self.metrics,
            ["method", "class"],
            lambda key: (names[key >> 40], key & ((1 << 40) - 1)),
        )
        return per_method, per_class

    def errors(self, limit: int = 20) -> list[dict[str, Any]]:
        """The commonest error reasons, counted in images (the rows of one method)."""
        order = sorted(self.methods)
        first = self.methods[order[0]] if order else -1
        ranked = sorted(self.reasons.items(), key=lambda kv: (-kv[1], str(kv[0][1])))
        return [{"error": e, "images": n} for (c, e), n in ranked if c == first][:limit]


def aggregate(
    output: str, opts: storage.StorageOptions | None = None, write: bool = True, where: bool = True
) -> dict[str, Any]:
    """Summarise a run's output and write ``_aggregate/`` next to it (CSV tables + counts.json);
    ``write=False`` only reads (the report of a read-only output); ``where=False`` leaves out where
    the model looks (its two passes over the heatmaps).

    Returns a dict with ``counts`` (dict; ``complete`` says whether ``_SUCCESS`` is there: if not, the
    totals are partial), ``per_method`` and ``per_class`` (Arrow tables) and ``where`` (where the
    model looks, :func:`lnstd.looks.where_the_model_looks`, which also writes its own CSV files).
    """
    opts = opts or storage.StorageOptions.from_env()
    out = Output(output, opts)
    ds = heatmap_dataset(output, opts)
    names = set(ds.schema.names)
    metrics = [m for m in column_metrics() if m in names]
    images, labelled = _footers(ds)
    fold = _Fold(metrics, "label" if labelled else "target")
    for _, batch in _batches(ds, ["method", "status", "error", fold.class_col, *metrics]):
        if batch.num_rows:
            fold.add(batch)
    counts = {
        "images": images["images"],
        "rows": int(fold.rows.sum()),
        "ok_images": images["ok"],
        "error_images": images["errors"],
        "methods": sorted(fold.methods),
        "shards": len(ds.files),
        "errors": fold.errors(),
        "complete": out.complete(),
    }
    per_method, per_class = fold.tables()
    looks = None
    if where:
        from .looks import where_the_model_looks  # it reads the heatmaps with this module's reader

        looks = where_the_model_looks(ds, out if write else None, opts)
    if write:
        # CSV, not Parquet: the output's only *.parquet files are the heatmap rows (see lnstd.output).
        for name, t in (("summary", per_method), ("per_class", per_class)):
            buf = io.BytesIO()
            pacsv.write_csv(t, buf)
            storage.write_bytes(out.path(AGGREGATE, f"{name}.csv"), buf.getvalue(), opts)
        storage.write_bytes(out.path(AGGREGATE, "counts.json"), json.dumps(counts, indent=1).encode(), opts)
    return {"counts": counts, "per_method": per_method, "per_class": per_class, "where": looks}


def plural(n: int, word: str) -> str:
    """``1 shard``, ``2 shards``, ``0 errors``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _codes(col: pa.Array, known: dict[str, int]) -> np.ndarray:
    """Small integer codes of a string column, ``known`` extended with new values."""
    for v in pc.unique(col).to_pylist():
        if v not in known:
            known[v] = len(known)
    values = pa.array(list(known), pa.string())
    return pc.index_in(col, value_set=values).to_numpy(zero_copy_only=False).astype(np.int64)


def _batches(
    ds: pads.Dataset, columns: list[str], batch_rows: int | None = None
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(part file, record batch of ``columns``), one file after the other, ``batch_rows`` (default
    BATCH_ROWS) at a time, read synchronously: memory holds one batch (the dataset scanner reads
    ahead of a slow consumer: 350 MB at 5M rows). A column a file lacks (written by an older
    version) comes as nulls."""
    for path in ds.files:
        with ds.filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            have = [c for c in columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=have):
                missing = [c for c in columns if c not in have]
                if missing:
                    arrays = [batch.column(c) if c in have else pa.nulls(batch.num_rows) for c in columns]
                    batch = pa.RecordBatch.from_arrays(arrays, names=columns)
                yield path, batch


def _floats(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64 NumPy, NaN where null (one Arrow cast per column)."""
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def _bin(v: np.ndarray) -> np.ndarray:
    u = np.clip(np.arcsinh(v / _SCALE), -_UMAX, _UMAX)
    return np.minimum(((u + _UMAX) / (2 * _UMAX) * _BINS).astype(np.int64), _BINS - 1)


def _median(counts: np.ndarray, sums: np.ndarray) -> float | None:
    total = counts.sum()
    if total == 0:
        return None
    b = int(np.searchsorted(np.cumsum(counts), total / 2))
    return float(sums[b] / counts[b])


def _table(
    groups: _Groups,
    metrics: list[str],
    keys: list[str],
    unpack: Any,
    hist: np.ndarray | None = None,
    hsum: np.ndarray | None = None,
) -> pa.Table:
    out = []
    for key, g in groups.ids.items():
        head = dict(zip(keys, unpack(key), strict=True))
        for j, m in enumerate(metrics):
            n = groups.n[g, j]
            if n == 0:
                continue
            row = {**head, "metric": m, "count": float(n), "mean": float(groups.mean[g, j]),
                   "std": float(np.sqrt(groups.m2[g, j] / n)), "min": float(groups.lo[g, j])}  # fmt: skip
            if hist is not None:
                row["median"] = _median(hist[key, j], hsum[key, j])
            row["max"] = float(groups.hi[g, j])
            row["higher_is_better"] = higher_is_better(m)
            out.append(row)
    order = {m: i for i, m in enumerate(metrics)}
    out.sort(key=lambda r: (*(r[k] for k in keys), order[r["metric"]]))
    if not out:
        return pa.table({k: pa.array([], pa.string()) for k in [*keys, "metric"]})
    return pa.Table.from_pylist(out)


def format_table(per_method: pa.Table) -> str:
    """The per-method summary as a fixed-width text table (columns as wide as their longest value)."""
    rows = per_method.to_pylist()
    wm = max([len("method"), *(len(r["method"]) for r in rows)])
    wk = max([len("metric"), *(len(r["metric"]) for r in rows)])
    head = f"{'method':{wm}s} {'metric':{wk}s} {'count':>7s} {'mean':>10s} {'std':>10s} {'median':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:{wm}s} {r['metric']:{wk}s} {r['count']:7.0f} {r['mean']:10.4f} "
            f"{(r['std'] or 0):10.4f} {r['median']:10.4f}"
        )
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """``lnstd aggregate``'s text: the counts in one line (marked partial without ``_SUCCESS``), the
    commonest error reasons, and the per-method table."""
    c = result["counts"]
    lines = [
        f"{plural(c['images'], 'image')} ({c['ok_images']} ok, {plural(c['error_images'], 'error')}), "
        f"{plural(c['rows'], 'row')}, {plural(c['shards'], 'shard')}, "
        f"{plural(len(c['methods']), 'method')}: {', '.join(c['methods'])}"
        + ("" if c["complete"] else " (partial: no _SUCCESS; a run is writing this output or did not finish)")
    ]
    lines += [f"  {plural(e['images'], 'image')}: {e['error']}" for e in c["errors"][:5]]
    lines.append(format_table(result["per_method"]))
    if result.get("where") is not None:
        lines += _where_lines(result["where"].classes)
    return "\n".join(lines)


def _where_lines(classes: pa.Table) -> list[str]:
    """Per method, the class whose maps put the most relevance on the image's border ring."""
    from .looks import RING_AREA, shown_classes

    rows = classes.to_pylist()
    out = []
    for method in sorted({r["method"] for r in rows}):
        kind, mine = shown_classes(rows, method)
        top = max(mine, key=lambda r: (r["border_share"], -r["class"]))
        what = "true class" if kind == "label" else "predicted class"
        out.append(
            f"{method}: most on the border, {what} {top['class']}: {100 * top['border_share']:.0f}% of its "
            f"relevance ({top['images']} images; a uniform map: {100 * RING_AREA:.0f}%)"
        )
    if out:
        out = ["where the model looks (_aggregate/where_classes.csv, where/*.csv):", *("  " + x for x in out)]
    return out
