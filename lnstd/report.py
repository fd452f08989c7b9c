"""One self-contained HTML page for a run: what a user can learn from any dataset, labelled or not.

Sections: a banner when the model had random weights; the configuration and counts; the first
failures with their files; the per-image values (prediction, probability, correctness, time), once;
per method, how concentrated its maps are, what it costs and, with masks, the mask metrics; how
much the methods agree (a rank-correlation matrix); with ``--faithfulness``, which map to believe
(methods ranked with intervals: lnstd/ranking.py); distributions; a gallery that fits the page.

No network requests: styles are inline and every picture is a data: URI. The metric tables are
``lnstd aggregate``'s figures (the page is built from the same function, which here only reads).
The map statistics (concentration, agreement) come from a bounded sample of images
(``MAP_SAMPLE``), so building the page does not grow with the dataset.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from . import storage
from .aggregate import aggregate, heatmap_dataset
from .metrics.registry import FAITHFULNESS_METRICS, column_metrics, higher_is_better
from .models import class_names
from .output import REPORT, Output
from .ranking import ranking_section
from .report_gallery import PER_IMAGE, gallery
from .report_html import CSS, agreement_html, curve_svg, esc, histogram_svg, legend, num, table
from .report_where import where_section
from .weights import RANDOM_WEIGHTS, Weights

__all__ = [
    "MAP_SAMPLE",
    "agreement",
    "build_report",
    "concentration",
    "write_report",
]

MAP_SAMPLE = 200  # images whose maps give the concentration and agreement figures
FAILURES_SHOWN = 20
TOP_SHARE = 0.1  # concentration: the share of a map's mass in its top 10% of tokens


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along the last axis of a 2-D array, ties sharing their average rank."""
    out = np.empty(x.shape, np.float64)
    for i, row in enumerate(x):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out[i] = (ends - (counts - 1) / 2.0)[inverse]
    return out


def _minmax(x: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1]; constant rows become NaN (they have no ranking and no shape)."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo, (x - lo) / (hi - lo), np.nan)


def concentration(maps: np.ndarray, top: float = TOP_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """How concentrated each map is, for (n, tokens) maps scaled to [0, 1] per map (as the mask
    metrics scale them): the share of the mass in the top ``top`` fraction of tokens (``ceil(top *
    tokens)``; a flat map gives about ``top``), and the entropy of the map as a distribution over
    tokens divided by ``log(tokens)`` (1 for a flat map, 0 when one token holds everything).
    Constant maps give NaN."""
    p = _minmax(np.asarray(maps, np.float64))
    n = p.shape[1]
    k = max(1, int(np.ceil(top * n)))
    total = p.sum(axis=1)
    share = np.sort(p, axis=1)[:, ::-1][:, :k].sum(axis=1) / total
    q = p / total[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1) / np.log(n)
    return share, np.where(np.isnan(total), np.nan, entropy)


def agreement(maps: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Method-by-method agreement: for maps {method: (n, tokens)} of the same n images on one grid,
    the mean over images of the Spearman rank correlation of two methods' maps (average ranks for
    ties), and the number of images where both maps vary (a constant map has no ranking)."""
    names = list(maps)
    ranks = {}
    for m, x in maps.items():
        x = np.asarray(x, np.float64)
        r = _average_ranks(x)
        r -= r.mean(axis=1, keepdims=True)
        norm = np.sqrt((r * r).sum(axis=1, keepdims=True))
        ranks[m] = np.where(norm > 0, r / np.where(norm > 0, norm, 1.0), np.nan)
    k = len(names)
    rho, count = np.full((k, k), np.nan), np.zeros((k, k), np.int64)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            per_image = (ranks[a] * ranks[b]).sum(axis=1)
            valid = ~np.isnan(per_image)
            count[i, j] = int(valid.sum())
            if count[i, j]:
                rho[i, j] = float(per_image[valid].mean())
    return rho, count


def _sample_maps(ds: pads.Dataset, ids: list[str], methods: list[str]) -> dict[str, np.ndarray]:
    """{method: (n, tokens)} maps of the images ``ids`` (in that order) on one common grid (the
    finest among the methods, bilinear), one row per image (the explained prediction where an
    image has several targets); images missing a method are left out for every method."""
    import torch.nn.functional as F

    rows = ds.to_table(
        columns=["image_id", "method", "heatmap", "grid_h", "grid_w", "target", "predicted"],
        filter=pc.field("image_id").isin(ids) & (pc.field("status") == "ok"),
    ).to_pylist()
    got: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["image_id"], r["method"])
        if key not in got or r["target"] == r["predicted"]:
            got[key] = r
    keep = [i for i in ids if all((i, m) in got for m in methods)]
    if not keep:
        return {}
    gh = max(got[(keep[0], m)]["grid_h"] for m in methods)
    gw = max(got[(keep[0], m)]["grid_w"] for m in methods)
    out = {}
    for m in methods:
        grids = []
        for i in keep:
            r = got[(i, m)]
            heat = torch.tensor(r["heatmap"], dtype=torch.float32).reshape(1, 1, r["grid_h"], r["grid_w"])
            if heat.shape[-2:] != (gh, gw):
                heat = F.interpolate(heat, size=(gh, gw), mode="bilinear", align_corners=False)
            grids.append(heat.flatten().numpy())
        out[m] = np.stack(grids)
    return out


def _own_grid_maps(ds: pads.Dataset, ids: list[str], method: str) -> np.ndarray:
    """(n, tokens) maps of one method on its own grid (for concentration)."""
    t = ds.to_table(
        columns=["image_id", "heatmap", "target", "predicted"],
        filter=pc.field("image_id").isin(ids) & (pc.field("status") == "ok") & (pc.field("method") == method),
    ).to_pylist()
    first: dict[str, list[float]] = {}
    for r in t:
        if r["image_id"] not in first or r["target"] == r["predicted"]:
            first[r["image_id"]] = r["heatmap"]
    sizes = {len(v) for v in first.values()}
    if len(sizes) != 1:  # no rows, or grids that differ between images: leave it out
        return np.zeros((0, 1))
    return np.asarray(list(first.values()), np.float64)


def _first_rows(t: pa.Table, method: str) -> pa.Table:
    """One row per image of ``method`` (the first, i.e. the top target when there are several)."""
    m = t.filter(pc.equal(t["method"], method))
    _, first = np.unique(np.asarray(m["image_id"].to_pylist(), dtype=object), return_index=True)
    return m.take(pa.array(np.sort(first)))


def _failures(ds: pads.Dataset, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` images with an error row (one row each), read without a full scan."""
    cols = ["image_id", "source", "error", "error_detail"]
    rows = ds.head(limit * 16, columns=cols, filter=pc.field("status") == "error").to_pylist()
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["image_id"], r)
    return list(seen.values())[:limit]


def build_report(
    output: str, samples: int = 12, metric: str | None = None, opts: storage.StorageOptions | None = None
) -> str:
    """The report page of a run's output, as an HTML string (reads the output, writes nothing)."""
    opts = opts or storage.StorageOptions.from_env()
    agg = aggregate(output, opts, write=False)
    counts, per_method = agg["counts"], agg["per_method"].to_pylist()
    recorded_out = Output(output, opts)
    recorded = recorded_out.read_manifest()
    manifest: dict[str, Any] = asdict(recorded) if recorded else (recorded_out.read_run() or {})
    config = manifest.get("config") or manifest.get("identity") or {}

    ds = heatmap_dataset(output, opts)
    names = ds.schema.names
    metric_cols = [m for m in column_metrics() if m in names]
    curve_cols = [c for c in names if c.endswith("_curve")]
    base_cols = ["image_id", "method", "status", "source", "target", "predicted"]
    t = ds.to_table(columns=base_cols + metric_cols + curve_cols, filter=pc.field("status") == "ok")
    curve_cols = [c for c in curve_cols if t[c].null_count < t.num_rows]  # written (--faithfulness)
    methods = counts["methods"]
    stat = {(r["method"], r["metric"]): r for r in per_method}

    out = [
        _head(output, manifest, config),
        _run_section(manifest, config, counts),
        _counts_section(ds, manifest, counts),
    ]
    names_of = class_names(config.get("model"), config.get("checkpoint"))
    out.append(_per_image(t, methods, stat, names_of))
    sample = _sample_ids(t, methods)
    out.append(_per_method(ds, sample, methods, stat))
    out.append(_agreement_section(ds, sample, methods))
    faithful = [m for m in FAITHFULNESS_METRICS if m in metric_cols and t[m].null_count < t.num_rows]
    if faithful:
        faith_rows = t.select(["image_id", "method", "target", *faithful]).to_pylist()
        out.append(ranking_section(faith_rows, methods))
    out.append(_distributions(t, methods, metric_cols, curve_cols))
    if agg["where"] is not None:
        out.append(where_section(ds, agg["where"], methods, lambda c: _class_name(c, names_of), opts))
    out.append(gallery(output, ds, t, methods, samples, metric, opts))
    out.append("</body></html>")
    return "\n".join(out)


def _head(output: str, manifest: dict[str, Any], config: dict[str, Any]) -> str:
    """The page's head, title, run id and, for a model with random weights, the banner."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>lnstd report</title><style>{CSS}</style></head><body>",
        f"<h1>lnstd report: <span class='path'>{esc(output)}</span></h1>",
        f"<p class='muted'>run {esc(manifest.get('run_id', '?'))}, generated "
        f"{esc(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
    ]
    weights = Weights.from_config(config)
    if weights is not None and weights.random:
        out.append(f"<div class='banner' id='random-weights'>{esc(RANDOM_WEIGHTS)}</div>")
    return "\n".join(out)


def _run_section(manifest: dict[str, Any], config: dict[str, Any], counts: dict[str, Any]) -> str:
    """Model, weights, methods and input; every setting and the versions, folded."""
    weights = Weights.from_config(config)
    key = [("model", config.get("model", "?")), ("weights", weights.describe() if weights else "?"),
           ("methods", ", ".join(counts["methods"])), ("input", config.get("input", "?"))]  # fmt: skip
    out = ["<h2>Run</h2>"]
    out.append(table([], [[f"<td class='k'>{esc(k)}</td>", f"<td class='k path'>{esc(v)}</td>"]
                                 for k, v in key], "run"))  # fmt: skip
    rows = [
        [f"<td class='k'>{esc(k)}</td>", f"<td class='k path'>{esc(json.dumps(v))}</td>"]
        for k, v in config.items()
    ]
    out.append(f"<details><summary>every setting ({len(rows)})</summary>")
    out.append(table(["setting", "value"], rows))
    if manifest.get("versions"):
        out.append(
            "<p class='muted'>" + esc(", ".join(f"{k} {v}" for k, v in manifest["versions"].items())) + "</p>"
        )
    out.append("</details>")
    return "\n".join(out)


def _counts_section(ds: pads.Dataset, manifest: dict[str, Any], counts: dict[str, Any]) -> str:
    """The counts, the errors by reason and the first failed images."""
    c_rows = [
        ["images", counts["images"]],
        ["ok images", counts["ok_images"]],
        ["error images", counts["error_images"]],
        ["rows (image x method)", counts["rows"]],
        ["shards", counts["shards"]],
    ]
    if manifest.get("timings"):
        c_rows.append(["elapsed (s)", f"{manifest['timings']['elapsed_s']:.1f}"])
    cells = [
        [f"<td class='k'>{esc(k)}</td>", f"<td id='count-{esc(k.split()[0])}-{i}'>{esc(v)}</td>"]
        for i, (k, v) in enumerate(c_rows)
    ]
    out = ["<h2>Counts</h2>", table(["", "count"], cells)]
    if counts["errors"]:
        reasons = [
            [f"<td class='k err'>{esc(e['error'])}</td>", f"<td>{e['images']}</td>"] for e in counts["errors"]
        ]
        out += ["<h3>Errors by reason</h3>", table(["reason", "images"], reasons)]
        failures = _failures(ds, FAILURES_SHOWN)
        rows = [
            [
                f"<td class='k path'>{esc(f['image_id'])}</td>",
                f"<td class='k path'>{esc(f['source'])}</td>",
                f"<td class='k err'>{esc(f['error'])}</td>",
                f"<td class='k path muted'>{esc(f['error_detail'] or '')}</td>",
            ]
            for f in failures
        ]
        out += [
            f"<h3>The first {len(failures)} failed images</h3>",
            table(["image", "source", "reason", "detail"], rows, "failures"),
        ]
    return "\n".join(out)


def _distributions(t: pa.Table, methods: list[str], metric_cols: list[str], curve_cols: list[str]) -> str:
    """Per-method histograms of every metric, and the mean perturbation curves."""
    out = []
    method_metrics = [
        m for m in metric_cols if m not in PER_IMAGE and m != "elapsed_ms" and t[m].null_count < t.num_rows
    ]
    if method_metrics:
        out.append("<h2>Distributions per method</h2>")
    for m in method_metrics:
        per = {}
        for method in methods:
            vals = pc.cast(t.filter(pc.equal(t["method"], method))[m].drop_null(), pa.float64()).to_numpy()
            if len(vals):
                per[method] = vals
        out.append(histogram_svg(per, m))
    if curve_cols:
        out.append("<h2>Perturbation curves</h2><div class='plots'>")
        for c in curve_cols:
            means = {}
            for method in methods:
                col = t.filter(pc.equal(t["method"], method))[c].drop_null()
                if len(col):
                    means[method] = np.asarray(col.to_pylist(), dtype=np.float64).mean(0)
            if means:
                out.append(curve_svg(means, c))
        out.append("</div>")
    return "\n".join(out)


def _sample_ids(t: pa.Table, methods: list[str]) -> list[str]:
    """Up to ``MAP_SAMPLE`` explained images, chosen with a fixed seed (the same on every build)."""
    if not methods or t.num_rows == 0:
        return []
    ids = sorted(set(t.filter(pc.equal(t["method"], methods[0]))["image_id"].to_pylist()))
    if len(ids) <= MAP_SAMPLE:
        return ids
    pick = np.random.default_rng(0).choice(len(ids), size=MAP_SAMPLE, replace=False)
    return [ids[i] for i in sorted(pick)]


def _class_name(c: int, names: list[str] | None) -> str:
    return f"{names[c]} ({c})" if names and 0 <= c < len(names) else str(c)


def _per_image(
    t: pa.Table, methods: list[str], stat: dict[tuple[str, str], dict], names: list[str] | None = None
) -> str:
    """The model's values, once: prediction (by class name where ``names`` gives it), probability,
    correctness, time per image."""
    out = ["<h2>Per image</h2>"]
    if t.num_rows == 0 or not methods:
        return out[0] + "<p class='muted'>no image was explained (every row is an error row)</p>"
    first = _first_rows(t, methods[0])
    rows = [["images explained", f"{first.num_rows}"]]
    if "correct" in first.column_names and first["correct"].null_count < first.num_rows:
        acc = pc.cast(first["correct"].drop_null(), pa.float64()).to_numpy()
        rows.append(["accuracy (images with a label)", f"{acc.mean():.3f} (n={len(acc)})"])
    else:
        rows.append(["accuracy", "no labels"])
    prob = pc.cast(first["probability"].drop_null(), pa.float64()).to_numpy()
    if len(prob):
        rows.append(["probability of the explained class: mean, median",
                     f"{prob.mean():.4f}, {np.median(prob):.4f}"])  # fmt: skip
    pred = first["predicted"].to_numpy()
    classes, n = np.unique(pred, return_counts=True)
    order = np.argsort(-n, kind="stable")[:5]

    def name(c: int) -> str:
        return _class_name(c, names)

    rows.append(["most predicted classes (images)",
                 ", ".join(f"{name(int(classes[i]))}: {int(n[i])}" for i in order)])  # fmt: skip
    times = [stat[(m, "elapsed_ms")]["mean"] for m in methods if (m, "elapsed_ms") in stat]
    if times:
        rows.append(["time per image, all methods (ms)", f"{sum(times):.1f}"])
    out.append(
        "<div class='box'><table id='per-image'>"
        + "".join(
            f"<tr><td class='k'>{esc(k)}</td><td class='k' data-key='{esc(k.split()[0])}'>{esc(v)}</td></tr>"
            for k, v in rows
        )
        + "</table></div>"
    )
    if len(prob):
        out.append(histogram_svg({"all images": prob}, "probability of the explained class"))
    return "".join(out)


def _per_method(
    ds: pads.Dataset, sample: list[str], methods: list[str], stat: dict[tuple[str, str], dict]
) -> str:
    """Per method: its cost, how concentrated its maps are, and the mask metrics when masks exist."""
    masks = [m for m in column_metrics() if m not in PER_IMAGE and m != "elapsed_ms"
             and any((meth, m) in stat for meth in methods)]  # fmt: skip
    header = ["method", "time per image (ms) ↓", f"mass in top {TOP_SHARE:.0%} of tokens",
              "entropy (1 = flat)"] + [f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in masks]  # fmt: skip
    body = []
    for method in methods:
        share, entropy = concentration(_own_grid_maps(ds, sample, method)) if sample else ([], [])
        cells = [f"<td class='k'>{esc(method)}</td>"]
        r = stat.get((method, "elapsed_ms"))
        cells.append(_stat_cell(method, "elapsed_ms", r, 1))
        for name, vals in (("top_share", share), ("entropy", entropy)):
            v = np.asarray(vals, np.float64)
            v = v[~np.isnan(v)]
            cells.append(
                f"<td data-method='{esc(method)}' data-stat='{name}' data-mean='{float(v.mean())!r}' "
                f"data-count='{len(v)}'>{num(v.mean(), 3)} ({len(v)})</td>"
                if len(v)
                else "<td>-</td>"
            )
        for m in masks:
            cells.append(_stat_cell(method, m, stat.get((method, m)), 4))
        body.append(cells)
    note = (
        f"<p class='muted'>time: the method's own work plus its share of the forward/backward pass it "
        f"shares with the other methods, mean per image (n); concentration: over {len(sample)} images "
        f"(maps min-max scaled; a flat map puts {TOP_SHARE:.0%} of its mass in the top {TOP_SHARE:.0%})"
        + (
            "; mask metrics: mean ± std (n; no ± when every value is the same), ↑ higher is better"
            if masks
            else "; no masks, so no mask metrics"
        )
        + "</p>"
    )
    return "<h2>Per method</h2>" + note + table(header, body, "metrics")


def _stat_cell(method: str, metric: str, r: dict | None, digits: int) -> str:
    if r is None:
        return "<td>-</td>"
    n = int(r["count"])
    if r["std"]:
        value = f"{num(r['mean'], digits)} ± {num(r['std'], digits)} ({n})"
    elif metric == "elapsed_ms":  # one batch: every image got the batch's time / its size
        value = f"{num(r['mean'], digits)} ({n}, one batch)"
    else:
        value = f"{num(r['mean'], digits)} ({n}, all equal)" if n > 1 else f"{num(r['mean'], digits)} (1)"
    return (
        f"<td data-method='{esc(method)}' data-metric='{esc(metric)}' data-mean='{r['mean']!r}' "
        f"data-count='{n}'>{value}</td>"
    )


def _agreement_section(ds: pads.Dataset, sample: list[str], methods: list[str]) -> str:
    head = "<h2>Agreement between methods</h2>"
    if len(methods) < 2:
        return head + "<p class='muted'>one method: nothing to compare</p>"
    maps = _sample_maps(ds, sample, methods) if sample else {}
    if not maps:
        return head + "<p class='muted'>no image has a map of every method</p>"
    rho, count = agreement(maps)
    n = len(next(iter(maps.values())))
    return (
        head + f"<p class='muted'>Spearman rank correlation of two methods' maps of the same image "
        f"(average ranks for ties; grids resampled to the finest), mean over {n} images; 1: the same "
        "ranking of tokens, 0: unrelated, -1: reversed</p>"
        + legend(("-1", "0", "1"), "cell colour: rank correlation", "legend-agreement")
        + agreement_html(methods, rho, count)
    )


def write_report(
    output: str,
    samples: int = 12,
    metric: str | None = None,
    out: str | None = None,
    opts: storage.StorageOptions | None = None,
) -> str:
    """Build the report of ``output`` and write it (default ``OUTPUT/_report.html``); returns where."""
    page = build_report(output, samples, metric, opts)
    dest = out or Output(output, opts).path(REPORT)
    storage.write_bytes(dest, page.encode(), opts)
    return dest
