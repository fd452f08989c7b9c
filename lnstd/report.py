"""One self-contained HTML page for a run: configuration, counts, metric tables, plots, gallery.

No network requests: styles are inline and every picture is a data: URI. The tables are
``lnstd aggregate``'s figures (the page is built from the same function).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from . import output as layout
from . import storage
from .aggregate import aggregate, heatmap_dataset
from .data import mat_ref, read_mat_sample
from .data.decode import decode_image
from .data.preprocess import Geometry
from .errors import OutputError
from .metrics.registry import METRICS, column_metrics, higher_is_better
from .viz import overlay

__all__ = ["build_report", "write_report"]

THUMB = 160
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.k,th.k{text-align:left}.muted{color:#777}.err{color:#b00}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #eee;padding:4px}
.gallery td{text-align:center;vertical-align:top;font-size:12px}.gallery img{display:block;margin:auto}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(
        f"<th class='k'>{_esc(h)}</th>" if i == 0 else f"<th>{_esc(h)}</th>" for i, h in enumerate(header)
    )
    body = "".join("<tr>" + "".join(rows_i) + "</tr>" for rows_i in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _histogram_svg(values: dict[str, np.ndarray], title: str, bins: int = 20) -> str:
    """Small-multiple histograms (one per method) on a shared x range, as inline SVG."""
    allv = np.concatenate([v for v in values.values() if len(v)]) if values else np.array([])
    if not len(allv):
        return ""
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        hi = lo + 1.0
    w, h, pad = 220, 90, 14
    parts = []
    for method, v in values.items():
        counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
        top = max(int(counts.max()), 1)
        bw = (w - 2 * pad) / bins
        bars = "".join(
            f"<rect x='{pad + i * bw:.1f}' y='{h - pad - c / top * (h - 2 * pad):.1f}' width='{bw - 1:.1f}' "
            f"height='{c / top * (h - 2 * pad):.1f}' fill='#c2410c'/>"
            for i, c in enumerate(counts)
        )
        parts.append(
            f"<div class='plot'><svg width='{w}' height='{h}' role='img' aria-label='{_esc(title)} {_esc(method)}'>"
            f"<text x='{pad}' y='11' font-size='11'>{_esc(method)}: {_esc(title)} (n={len(v)})</text>{bars}"
            f"<text x='{pad}' y='{h - 2}' font-size='9' fill='#777'>{lo:.3g}</text>"
            f"<text x='{w - pad}' y='{h - 2}' font-size='9' fill='#777' text-anchor='end'>{hi:.3g}</text>"
            "</svg></div>"
        )
    return "<div class='plots'>" + "".join(parts) + "</div>"


def _curve_svg(curves: dict[str, np.ndarray], title: str) -> str:
    """Mean curve per method (x = fraction of pixels removed, 0..0.9), as inline SVG."""
    w, h, pad = 320, 180, 24
    colours = ["#c2410c", "#1d4ed8", "#15803d", "#7e22ce", "#a16207", "#0f766e"]
    lines, legend = [], []
    top = max(float(np.nanmax(c)) for c in curves.values()) or 1.0
    for k, (method, c) in enumerate(curves.items()):
        xs = np.linspace(pad, w - pad, len(c))
        ys = h - pad - c / top * (h - 2 * pad)
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
        col = colours[k % len(colours)]
        lines.append(f"<polyline fill='none' stroke='{col}' stroke-width='2' points='{pts}'/>")
        legend.append(
            f"<text x='{w - pad}' y='{14 + 12 * k}' font-size='10' fill='{col}' text-anchor='end'>{_esc(method)}</text>"
        )
    return (
        f"<div class='plot'><svg width='{w}' height='{h}' role='img' aria-label='{_esc(title)}'>"
        f"<text x='{pad}' y='12' font-size='11'>{_esc(title)}</text>{''.join(lines)}{''.join(legend)}</svg></div>"
    )


def _thumb_size(width: int, height: int) -> tuple[int, int]:
    s = THUMB / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _load_thumb(source: str, opts: storage.StorageOptions) -> Image.Image | None:
    """The source image at thumbnail size (the same decoder as the job), or None if unreadable."""
    try:
        if mat_ref(source):
            img = Image.fromarray(read_mat_sample(source)[0], "RGB")
        else:
            img = decode_image(storage.read_bytes(source, opts), draft=lambda w, h: _thumb_size(w, h))[0]
    except (OSError, ValueError):
        return None
    return img.resize(_thumb_size(*img.size), Image.BILINEAR)


def build_report(
    output: str, samples: int = 12, metric: str | None = None, opts: storage.StorageOptions | None = None
) -> str:
    """The report page of a run's output, as an HTML string."""
    opts = opts or storage.StorageOptions.from_env()
    agg = aggregate(output, opts)
    counts, per_method = agg["counts"], agg["per_method"].to_pylist()
    manifest: dict[str, Any] = {}
    for name in (layout.MANIFEST, layout.RUN):
        state = layout.read_state(output, name, opts)
        if state is not None:
            manifest = state
            break
    config = manifest.get("config") or manifest.get("identity") or {}

    ds = heatmap_dataset(output, opts)
    names = ds.schema.names
    metric_cols = [m for m in column_metrics() if m in names]
    curve_cols = [c for c in names if c.endswith("_curve")]
    base_cols = ["image_id", "method", "status", "source", "target", "predicted"]
    t = ds.to_table(columns=base_cols + metric_cols + curve_cols, filter=pc.field("status") == "ok")
    methods = counts["methods"]

    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>lnstd report</title><style>{CSS}</style></head><body>"
    ]
    out.append(f"<h1>lnstd report: {_esc(output)}</h1>")
    out.append(
        f"<p class='muted'>run {_esc(manifest.get('run_id', '?'))}, generated "
        f"{_esc(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>"
    )

    out.append("<h2>Run configuration</h2>")
    rows = [
        [f"<td class='k'>{_esc(k)}</td>", f"<td class='k'>{_esc(json.dumps(v))}</td>"]
        for k, v in config.items()
    ]
    out.append(_table(["setting", "value"], rows))
    if manifest.get("versions"):
        out.append(
            "<p class='muted'>"
            + _esc(", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
            + "</p>"
        )

    out.append("<h2>Counts</h2>")
    c_rows = [
        ["images", counts["images"]],
        ["ok images", counts["ok_images"]],
        ["error images", counts["error_images"]],
        ["rows (image x method)", counts["rows"]],
        ["shards", counts["shards"]],
    ]
    if manifest.get("timings"):
        c_rows.append(["elapsed (s)", f"{manifest['timings']['elapsed_s']:.1f}"])
    out.append(
        _table(
            ["", "count"],
            [
                [f"<td class='k'>{_esc(k)}</td>", f"<td id='count-{_esc(k.split()[0])}-{i}'>{_esc(v)}</td>"]
                for i, (k, v) in enumerate(c_rows)
            ],
        )
    )
    if counts["errors"]:
        out.append("<h3>Errors</h3>")
        out.append(
            _table(
                ["reason", "images"],
                [
                    [f"<td class='k err'>{_esc(e['error'])}</td>", f"<td>{e['images']}</td>"]
                    for e in counts["errors"]
                ],
            )
        )

    out.append(
        "<h2>Metrics per method</h2><p class='muted'>mean ± std (n); ↑ higher is better, ↓ lower is better</p>"
    )
    present = [m for m in column_metrics() if any(r["metric"] == m for r in per_method)]
    header = ["method"] + [f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in present]
    body = []
    for method in methods:
        cells = [f"<td class='k'>{_esc(method)}</td>"]
        for m in present:
            r = next((r for r in per_method if r["method"] == method and r["metric"] == m), None)
            if r is None:
                cells.append("<td>-</td>")
                continue
            cells.append(
                f"<td data-method='{_esc(method)}' data-metric='{_esc(m)}' data-mean='{r['mean']!r}' "
                f"data-count='{int(r['count'])}'>{r['mean']:.4f} ± {(r['std'] or 0):.4f} ({int(r['count'])})</td>"
            )
        body.append(cells)
    out.append(_table(header, body, "metrics"))

    out.append("<h2>Distributions</h2>")
    for m in metric_cols:
        per = {}
        for method in methods:
            col = t.filter(pc.equal(t["method"], method))[m]
            vals = pc.cast(col.drop_null(), pa.float64()).to_numpy()
            if len(vals):
                per[method] = vals
        out.append(_histogram_svg(per, m))
    if curve_cols:
        out.append("<h2>Perturbation curves</h2><div class='plots'>")
        for c in curve_cols:
            means = {}
            for method in methods:
                col = t.filter(pc.equal(t["method"], method))[c].drop_null()
                if len(col):
                    means[method] = np.asarray(col.to_pylist(), dtype=np.float64).mean(0)
            if means:
                out.append(_curve_svg(means, c))
        out.append("</div>")

    out.append(_gallery(ds, t, methods, samples, metric, opts))
    out.append("</body></html>")
    return "\n".join(out)


def _gallery(ds, t: pa.Table, methods: list[str], samples: int, metric: str | None, opts) -> str:
    head = "<h2>Gallery</h2>"
    if samples <= 0:
        return ""
    if t.num_rows == 0:
        return head + "<p class='muted'>no image was explained (every row is an error row)</p>"
    if metric is None:
        fg = "foreground_iou"
        metric = fg if fg in t.column_names and t[fg].null_count < t.num_rows else "probability"
    if metric not in t.column_names or metric not in METRICS:
        raise OutputError(f"--metric {metric!r} is not a metric column of this output")
    ranker = "lnstd" if "lnstd" in methods else methods[0]
    r = t.filter(pc.and_(pc.equal(t["method"], ranker), pc.is_valid(t[metric])))
    # Prefer the rows that explain the prediction; a run of --target label with a weak model may
    # have none, and then every row counts.
    agree = r.filter(pc.equal(r["target"], r["predicted"])) if r.num_rows else r
    r = agree if agree.num_rows else r
    ids = r["image_id"].to_pylist()
    vals = pc.cast(r[metric], pa.float64()).to_numpy()
    seen: dict[str, float] = {}
    for i, v in zip(ids, vals, strict=True):
        seen.setdefault(i, float(v))
    if not seen:
        return head + f"<p class='muted'>no image has a {_esc(metric)} value to rank by</p>"
    order = sorted(seen, key=seen.__getitem__, reverse=higher_is_better(metric))
    k = max(1, samples // 3)
    best = order[:k]
    worst = [i for i in order[::-1][:k] if i not in best]
    rest = [i for i in order if i not in best and i not in worst]
    n_rand = min(max(samples - len(best) - len(worst), 0), len(rest))
    rand = [rest[j] for j in sorted(np.random.default_rng(0).choice(len(rest), size=n_rand, replace=False))]
    chosen = [("best", i) for i in best] + [("worst", i) for i in worst] + [("random", i) for i in rand]

    cols = ["image_id", "method", "source", "heatmap", "grid_h", "grid_w", "target", "predicted"]
    cols += [c for c in ("width", "height", "crop_box") if c in ds.schema.names]
    hm = ds.to_table(
        columns=cols, filter=pc.field("image_id").isin([i for _, i in chosen]) & (pc.field("status") == "ok")
    ).to_pylist()
    maps: dict[tuple[str, str], dict] = {}
    for row in hm:
        key = (row["image_id"], row["method"])
        if key not in maps or row["target"] == row["predicted"]:
            maps[key] = row
    out = [
        f"{head}<p class='muted'>ranked by {_esc(metric)} of {_esc(ranker)}: best, worst and random images</p>"
    ]
    header = "".join(f"<th>{_esc(h)}</th>" for h in ["", "image", *methods])
    body = []
    for group, image_id in chosen:
        src = next((maps[(image_id, m)]["source"] for m in methods if (image_id, m) in maps), None)
        thumb = _load_thumb(src, opts) if src else None
        cells = [f"<td>{_esc(group)}<br>{_esc(image_id)}<br>{_esc(metric)}={seen[image_id]:.3f}</td>"]
        if thumb is None:
            cells.append("<td class='muted'>source unreadable</td>" + "<td></td>" * len(methods))
        else:
            cells.append(f"<td><img class='g' alt='{_esc(image_id)}' src='{_img_uri(thumb)}'></td>")
            for m in methods:
                row = maps.get((image_id, m))
                if row is None:
                    cells.append("<td></td>")
                    continue
                heat = torch.tensor(row["heatmap"], dtype=torch.float32).reshape(row["grid_h"], row["grid_w"])
                geom = (
                    Geometry(row["width"], row["height"], tuple(row["crop_box"]))
                    if row.get("crop_box") is not None
                    else None
                )
                pic = overlay(thumb, heat, geometry=geom)
                cells.append(f"<td><img class='g' alt='{_esc(m)}' src='{_img_uri(pic)}'></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + f"<table class='gallery'><tr>{header}</tr>{''.join(body)}</table>"


def write_report(
    output: str,
    samples: int = 12,
    metric: str | None = None,
    out: str | None = None,
    opts: storage.StorageOptions | None = None,
) -> str:
    """Build the report of ``output`` and write it (default ``OUTPUT/_report.html``); returns where."""
    page = build_report(output, samples, metric, opts)
    dest = out or layout.uri(output, layout.REPORT)
    storage.write_bytes(dest, page.encode(), opts)
    return dest
