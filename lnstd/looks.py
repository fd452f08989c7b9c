"""Where the model looks: per class, the mean map on a common grid; per image, the share of its
relevance on the image's border ring, in the object's mask (where masks exist), and how far its map
lies from its class's mean map.

``lnstd aggregate`` writes ``_aggregate/where_classes.csv`` (one row per method, class kind and class:
images, mean border share, mean share in the mask, mean distance, and the mean map) and
``_aggregate/where/part-NNNNN.csv`` (one file per heatmap part, a row per map: its figures), both
CSV that DuckDB reads (``read_csv('out/_aggregate/where/*.csv')``); the report draws the mean maps and
the images whose maps lie farthest from their class's usual place or from their object.

A map counts for class ``c`` of kind ``predicted`` when it explains the model's prediction ``c``
(``target == predicted``), and of kind ``label`` when it explains the true class ``c``
(``target == label``). Each map is min-max normalised on its own grid, then resized (bilinear) to a
common GRID x GRID grid (bilinear up, area average down); its *relevance distribution* is that
map divided by its sum.

- ``border_share``: the share of the relevance distribution on the outer ring of the common grid (one
  cell of GRID on each side: :data:`RING_AREA` of the image, the share a uniform map has).
- ``in_mask``: the row's ``mass_in_mask`` (the share of relevance inside the object's mask), where
  the input has masks.
- ``distance``: the total-variation distance between the map's relevance distribution and its class
  mean map's (both summing to 1): the share of relevance that would have to move, 0 to 1.

It streams, in two passes over the heatmaps (the class means first, then each map's distance): its
memory grows with methods x classes x GRID^2, never with the rows; the galleries keep the ``top``
farthest maps per method in a heap. benchmarks/bench_scale.py measures its memory against N.
"""

from __future__ import annotations

import heapq
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from . import storage
from .aggregate import _batches, _codes, _floats

__all__ = [
    "GRID",
    "RING_AREA",
    "Where",
    "common_grid",
    "resize_matrix",
    "shown_classes",
    "where_the_model_looks",
]

GRID = 16
RING_AREA = 1 - (GRID - 2) ** 2 / GRID**2  # the border ring's share of the image (0.234)
BATCH_ROWS = 8192  # rows per record batch: heatmaps are read here, unlike aggregate's other columns
KINDS = ("predicted", "label")
_CLASSES = 1 << 40  # a group's key: (method code * len(KINDS) + kind) * _CLASSES + class
# what the two passes read (a column a part lacks comes as nulls: no mass_in_mask: no masks)
_COLUMNS = ["image_id", "method", "status", "target", "predicted", "label", "heatmap", "grid_h", "grid_w",
            "mass_in_mask"]  # fmt: skip


def common_grid(heat: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """(n, gh*gw) maps, each min-max normalised, resized to (n, GRID*GRID) relevance distributions
    (each sums to 1; a constant map becomes uniform). Resizing is bilinear (half-pixel centres) when
    a side grows and an area average when it shrinks (:func:`resize_matrix`); NumPy only."""
    x = np.asarray(heat, np.float64).reshape(-1, gh, gw)
    lo = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - lo
    x = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 1.0)
    x = resize_matrix(gh, GRID) @ x @ resize_matrix(gw, GRID).T
    x = np.clip(x.reshape(len(x), -1), 0, None)
    total = x.sum(axis=1, keepdims=True)
    return np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / GRID**2)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights, rows summing to 1: linear interpolation at the output cells' centres
    (half-pixel, clamped at the edges) when n_out >= n_in, else each output cell the average of the
    input over its span (fractional cells weighted by their overlap)."""
    w = np.zeros((n_out, n_in))
    if n_out >= n_in:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        left = np.floor(pos).astype(int)
        right = np.minimum(left + 1, n_in - 1)
        frac = pos - left
        w[np.arange(n_out), left] += 1 - frac
        w[np.arange(n_out), right] += frac
        return w
    edges = np.arange(n_out + 1) * n_in / n_out
    for i in range(n_out):
        for k in range(int(np.floor(edges[i])), int(np.ceil(edges[i + 1]))):
            w[i, k] = min(edges[i + 1], k + 1) - max(edges[i], k)
    return w / w.sum(axis=1, keepdims=True)


_RING = np.ones((GRID, GRID), bool)
_RING[1:-1, 1:-1] = False
_RING = _RING.ravel()


@dataclass
class Where:
    """The figures of ``where_the_model_looks``: ``classes`` (the where_classes.csv table) and, per
    method, the ``top`` maps farthest from their class's mean (``far``), with the most relevance on the
    border ring (``border``: a corner watermark, a frame) and, where masks exist, with the least
    relevance in the object (``off``): lists of (value, image_id, class), largest value first."""

    classes: pa.Table
    far: dict[str, list[tuple[float, str, int]]] = field(default_factory=dict)
    off: dict[str, list[tuple[float, str, int]]] = field(default_factory=dict)
    border: dict[str, list[tuple[float, str, int]]] = field(default_factory=dict)


class _Means:
    """Running sums of relevance distributions and figures per group (method, kind, class)."""

    def __init__(self) -> None:
        self.methods: dict[str, int] = {}  # method -> code (aggregate's _codes)
        self.groups: dict[int, int] = {}  # key (method code, kind, class: _key) -> row of sums/stats
        self.sums = np.zeros((0, GRID * GRID))
        self.stats = np.zeros((0, 5))  # images, border sum, in-mask count, in-mask sum, distance sum

    def ids(self, code: np.ndarray, kind: int, cls: np.ndarray, grow: bool = True) -> np.ndarray:
        """Group ids of rows (method codes, a kind, classes); new groups are made when ``grow``."""
        uniq, inv = np.unique((code * len(KINDS) + kind) * _CLASSES + cls, return_inverse=True)
        out = np.empty(len(uniq), np.int64)
        for u, k in enumerate(uniq.tolist()):
            if k not in self.groups:
                if not grow:
                    raise KeyError(k)
                self.groups[k] = len(self.groups)
            out[u] = self.groups[k]
        more = len(self.groups) - len(self.sums)
        if more > 0:
            self.sums = np.vstack([self.sums, np.zeros((more, GRID * GRID))])
            self.stats = np.vstack([self.stats, np.zeros((more, 5))])
        return out[inv.reshape(-1)]

    def key(self, k: int) -> tuple[str, str, int]:
        """(method, kind, class) of a group key."""
        names = list(self.methods)  # in code order
        mk, cls = divmod(k, _CLASSES)
        return names[mk // len(KINDS)], KINDS[mk % len(KINDS)], cls


def _ok_batches(ds: pads.Dataset, columns: list[str]) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(part file, record batch of its ok rows), BATCH_ROWS at a time (aggregate's reader)."""
    for path, batch in _batches(ds, columns, BATCH_ROWS):
        batch = batch.filter(pc.fill_null(pc.equal(batch.column("status"), "ok"), False))
        if batch.num_rows:
            yield path, batch


def _rows(batch: pa.RecordBatch) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, their (n, GRID^2) distributions), one group per grid size in the batch; rows
    whose map holds a non-finite value are left out (of the class means and the per-map files)."""
    gh = pc.fill_null(batch.column("grid_h"), 0).to_numpy(zero_copy_only=False)
    gw = pc.fill_null(batch.column("grid_w"), 0).to_numpy(zero_copy_only=False)
    heat_col = batch.column("heatmap")
    for h, w in sorted(set(zip(gh.tolist(), gw.tolist(), strict=True))):
        if h <= 0 or w <= 0:
            continue
        idx = np.flatnonzero((gh == h) & (gw == w))
        values = pc.list_flatten(heat_col.take(pa.array(idx))).to_numpy(zero_copy_only=False)
        values = values.astype(np.float64).reshape(len(idx), h * w)
        finite = np.isfinite(values).all(axis=1)  # a map with a NaN or inf counts nowhere: its own fault
        if finite.any():
            yield idx[finite], common_grid(values[finite], h, w)


def _keys(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """Per kind, the class each row counts for (-1: none)."""

    def ints(name: str) -> np.ndarray:
        return pc.fill_null(pc.cast(batch.column(name), pa.int64()), -1).to_numpy(zero_copy_only=False)

    target, predicted, label = ints("target"), ints("predicted"), ints("label")
    return {
        "predicted": np.where((target == predicted) & (predicted >= 0), predicted, -1),
        "label": np.where((target == label) & (label >= 0), label, -1),
    }


def where_the_model_looks(
    ds: pads.Dataset, output: Any = None, opts: storage.StorageOptions | None = None, top: int = 10
) -> Where:
    """Two streaming passes over the ok rows of ``ds`` (a run's heatmaps); with ``output`` (an
    :class:`lnstd.output.Output`) it writes ``_aggregate/where_classes.csv`` and one
    ``_aggregate/where/part-NNNNN.csv`` per heatmap part."""
    means = _Means()
    for _, batch in _ok_batches(ds, _COLUMNS):
        code = _codes(batch.column("method"), means.methods)
        keys, mask = _keys(batch), _mask(batch)
        for idx, dist in _rows(batch):
            border = dist[:, _RING].sum(axis=1)
            for k, kind in enumerate(KINDS):
                sel = np.flatnonzero(keys[kind][idx] >= 0)
                if not len(sel):
                    continue
                g = means.ids(code[idx[sel]], k, keys[kind][idx[sel]])
                np.add.at(means.sums, g, dist[sel])
                m = mask[idx[sel]]
                has = ~np.isnan(m)
                np.add.at(means.stats, (g, 0), 1.0)
                np.add.at(means.stats, (g, 1), border[sel])
                np.add.at(means.stats, (g[has], 2), 1.0)
                np.add.at(means.stats, (g[has], 3), m[has])
    mean_maps = means.sums / np.maximum(means.stats[:, :1], 1)
    mean_maps /= np.maximum(mean_maps.sum(axis=1, keepdims=True), 1e-300)

    far: dict[str, list] = {}
    off: dict[str, list] = {}
    on_border: dict[str, list] = {}
    names = list(means.methods)
    part: tuple[str, list[pa.Table]] | None = None
    for path, batch in _ok_batches(ds, _COLUMNS):
        if part is not None and part[0] != path:
            _write_part(output, part, opts)
            part = None
        code = _codes(batch.column("method"), means.methods)
        keys, mask = _keys(batch), _mask(batch)
        for idx, dist in _rows(batch):
            pred, lab = keys["predicted"][idx], keys["label"][idx]
            kind = np.where(pred >= 0, 0, np.where(lab >= 0, 1, -1))  # a row's own: predicted first
            cls = np.where(pred >= 0, pred, lab)
            border = dist[:, _RING].sum(axis=1)
            d = np.full(len(idx), np.nan)
            for k, name in enumerate(KINDS):  # a class's mean distance counts every map of its kind
                sel = np.flatnonzero(keys[name][idx] >= 0)
                if len(sel):
                    g = means.ids(code[idx[sel]], k, keys[name][idx[sel]], grow=False)
                    dk = 0.5 * np.abs(dist[sel] - mean_maps[g]).sum(axis=1)
                    np.add.at(means.stats, (g, 4), dk)
                    own = kind[sel] == k
                    d[sel[own]] = dk[own]
            m = mask[idx]
            for c in np.unique(code[idx]).tolist():
                mine = code[idx] == c
                _keep_top(far.setdefault(names[c], []), d[mine], batch, idx[mine], cls[mine], top)
                _keep_top(off.setdefault(names[c], []), 1 - m[mine], batch, idx[mine], cls[mine], top)
                _keep_top(on_border.setdefault(names[c], []), border[mine], batch, idx[mine], cls[mine], top)
            if output is not None:
                table = pa.table(
                    {
                        "image_id": batch.column("image_id").take(pa.array(idx)),
                        "method": batch.column("method").take(pa.array(idx)),
                        "target": batch.column("target").take(pa.array(idx)),
                        "kind": pa.array(np.array((*KINDS, None), object)[kind], pa.string()),
                        "class": pa.array(cls, mask=kind < 0),
                        "border_share": pa.array(border),
                        "in_mask": pa.array(m, mask=np.isnan(m)),
                        "distance": pa.array(d, mask=np.isnan(d)),
                    }
                )
                part = (path, [*(part[1] if part else []), table])
    if part is not None:
        _write_part(output, part, opts)
    classes = _classes(means, mean_maps)
    if output is not None:
        _write_csv(output, "where_classes.csv", classes, opts)
    return Where(
        classes,
        {m: sorted(v, reverse=True) for m, v in far.items()},
        {m: sorted(v, reverse=True) for m, v in off.items() if v},
        {m: sorted(v, reverse=True) for m, v in on_border.items()},
    )


def _mask(batch: pa.RecordBatch) -> np.ndarray:
    return _floats(batch.column("mass_in_mask"))  # NaN where a row has no mask (or the run none)


def _keep_top(
    heap: list, values: np.ndarray, batch: pa.RecordBatch, idx: np.ndarray, cls: np.ndarray, top: int
) -> None:
    """Fold the ``top`` largest of ``values`` (NaN skipped) into ``heap`` as (value, image id, class)."""
    valid = np.flatnonzero(~np.isnan(values))
    if not len(valid):
        return
    best = valid[np.argsort(-values[valid], kind="stable")[:top]]
    ids = batch.column("image_id").take(pa.array(idx[best])).to_pylist()
    for j, image_id in zip(best.tolist(), ids, strict=True):
        item = (float(values[j]), image_id, int(cls[j]))
        if len(heap) < top:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)


def _write_part(output: Any, part: tuple[str, list[pa.Table]], opts: storage.StorageOptions | None) -> None:
    """One heatmap part's per-map figures as ``_aggregate/where/<its name>.csv``."""
    name = part[0].rsplit("/", 1)[-1].removesuffix(".parquet")
    _write_csv(output, f"where/{name}.csv", pa.concat_tables(part[1]), opts)


def _classes(means: _Means, mean_maps: np.ndarray) -> pa.Table:
    named = sorted(
        ((means.key(k), g) for k, g in means.groups.items()),
        key=lambda kg: (kg[0][0], KINDS.index(kg[0][1]), kg[0][2]),  # method, kind's order, class
    )
    keys = [k for k, _ in named]
    g = np.array([g for _, g in named], np.int64)
    s = means.stats[g] if len(g) else np.zeros((0, 5))
    n = np.maximum(s[:, 0], 1)
    return pa.table(
        {
            "method": pa.array([k[0] for k in keys], pa.string()),
            "kind": pa.array([k[1] for k in keys], pa.string()),
            "class": pa.array([k[2] for k in keys], pa.int64()),
            "images": pa.array(s[:, 0].astype(np.int64)),
            "border_share": pa.array(s[:, 1] / n),
            "in_mask": pa.array(s[:, 3] / np.maximum(s[:, 2], 1), mask=s[:, 2] == 0),
            "distance": pa.array(s[:, 4] / n),
            "map": pa.array([";".join(f"{v:.5f}" for v in mean_maps[i]) for i in g.tolist()], pa.string()),
        }
    )


def shown_classes(rows: list[dict[str, Any]], method: str) -> tuple[str, list[dict[str, Any]]]:
    """The class kind a summary of ``method`` shows (``label``, true classes, where the output has
    labels, else ``predicted``) and its rows of ``where_classes`` (``rows``: that table as dicts)."""
    mine = [r for r in rows if r["method"] == method]
    kind = "label" if any(r["kind"] == "label" for r in mine) else "predicted"
    return kind, [r for r in mine if r["kind"] == kind]


def _write_csv(output: Any, name: str, table: pa.Table, opts: storage.StorageOptions | None) -> None:
    from .output import AGGREGATE

    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes(output.path(AGGREGATE, *name.split("/")), buf.getvalue(), opts)
