"""``lnstd aggregate``: counts, errors, and per-method / per-class statistics of every metric column.

Reads ``heatmaps/`` of a run's output (local or S3) and writes ``_aggregate/`` next to it:
``summary.csv`` (method x metric), ``per_class.csv`` (method x class x metric) and ``counts.json``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from . import output as layout
from . import storage
from .errors import OutputError
from .metrics.registry import column_metrics, higher_is_better

__all__ = ["aggregate", "format_table", "heatmap_dataset", "plural"]

STATS = ("count", "mean", "stddev", "min", "approximate_median", "max")


def heatmap_dataset(output: str, opts: storage.StorageOptions) -> pads.Dataset:
    """The heatmap rows of a run's output as a pyarrow dataset; a clear error if there are none."""
    uri = layout.uri(output, layout.HEATMAPS)
    fs, path = storage.resolve(uri, opts)
    if fs.get_file_info(path).type != storage.pafs.FileType.Directory and not storage.list_names(uri, opts):
        raise OutputError(
            f"{output}: no lnstd output here (no {layout.HEATMAPS}/ folder); give the --output of a run"
        )
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    if not ds.files:
        raise OutputError(
            f"{output}: the run has committed no shard yet (no {layout.HEATMAPS}/part-*.parquet)"
        )
    return ds


def _read(output: str, opts: storage.StorageOptions) -> pa.Table:
    ds = heatmap_dataset(output, opts)
    cols = [c for c in ds.schema.names if c not in ("heatmap", "heatmap_png")]
    table = ds.to_table(columns=cols)
    if "correct" in table.column_names:
        table = table.set_column(
            table.column_names.index("correct"), "correct", pc.cast(table["correct"], pa.float64())
        )
    return table


def _stats(table: pa.Table, keys: list[str]) -> pa.Table:
    ok = table.filter(pc.equal(table["status"], "ok"))
    parts = []
    for metric in column_metrics():
        if metric not in ok.column_names:
            continue
        col = ok.filter(pc.is_valid(ok[metric]))
        if col.num_rows == 0:
            continue
        g = col.group_by(keys).aggregate([(metric, s) for s in STATS])  # columns named metric_stat
        out = {k: g[k] for k in keys}
        out["metric"] = pa.array([metric] * g.num_rows)
        for s in STATS:
            name = "median" if s == "approximate_median" else ("std" if s == "stddev" else s)
            out[name] = pc.cast(g[f"{metric}_{s}"], pa.float64())
        out["higher_is_better"] = pa.array([higher_is_better(metric)] * g.num_rows)
        parts.append(pa.table(out))
    if not parts:
        return pa.table({k: pa.array([], pa.string()) for k in [*keys, "metric"]})
    return pa.concat_tables(parts).sort_by([(k, "ascending") for k in [*keys, "metric"]])


def aggregate(output: str, opts: storage.StorageOptions | None = None, write: bool = True) -> dict[str, Any]:
    """Summarise a run's output and write ``_aggregate/`` next to it (CSV tables + counts.json);
    ``write=False`` only reads (the report of a read-only output).

    Returns a dict with ``counts`` (dict), ``per_method`` and ``per_class`` (Arrow tables).
    """
    opts = opts or storage.StorageOptions.from_env()
    table = _read(output, opts)
    status = table["status"]
    images = pc.count_distinct(table["image_id"]).as_py()
    err = table.filter(pc.equal(status, "error"))
    err_images = pc.count_distinct(err["image_id"]).as_py() if err.num_rows else 0
    reasons = (
        err.group_by("error")
        .aggregate([("image_id", "count_distinct")])
        .sort_by([("image_id_count_distinct", "descending")])
        if err.num_rows
        else None
    )
    counts = {
        "images": images,
        "rows": table.num_rows,
        "ok_images": images - err_images,
        "error_images": err_images,
        "methods": sorted(set(table["method"].to_pylist())),
        "shards": pc.count_distinct(table["shard"]).as_py(),
        "errors": []
        if reasons is None
        else [
            {"error": r["error"], "images": r["image_id_count_distinct"]} for r in reasons.to_pylist()[:20]
        ],
    }
    per_method = _stats(table, ["method"])
    class_col = "label" if table["label"].null_count < table.num_rows else "target"
    by_class = table.append_column("class", pc.cast(table[class_col], pa.int64()))
    per_class = _stats(by_class.filter(pc.is_valid(by_class["class"])), ["method", "class"])
    if not write:
        return {"counts": counts, "per_method": per_method, "per_class": per_class}
    # CSV, not Parquet: the output's only *.parquet files are the heatmap rows (see lnstd.output).
    for name, t in (("summary", per_method), ("per_class", per_class)):
        buf = io.BytesIO()
        pacsv.write_csv(t, buf)
        storage.write_bytes(layout.uri(output, layout.AGGREGATE, f"{name}.csv"), buf.getvalue(), opts)
    storage.write_bytes(
        layout.uri(output, layout.AGGREGATE, "counts.json"), json.dumps(counts, indent=1).encode(), opts
    )
    return {"counts": counts, "per_method": per_method, "per_class": per_class}


def plural(n: int, word: str) -> str:
    """``1 shard``, ``2 shards``, ``0 errors``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
