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

import base64
import datetime as dt
import html
import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from PIL import Image

from . import storage
from .aggregate import aggregate, heatmap_dataset
from .data import mat_ref, read_mat_sample
from .data.decode import decode_image, decode_mask
from .data.preprocess import Geometry
from .errors import InputError, OutputError
from .metrics.mask import MASK_METRICS as MASK_COLUMNS
from .metrics.registry import FAITHFULNESS_METRICS, METRICS, column_metrics, higher_is_better
from .models import class_names
from .output import REPORT, Output
from .plan import Plan
from .ranking import ranking_section
from .viz import colorize, contour, overlay
from .weights import RANDOM_WEIGHTS, Weights

__all__ = [
    "MAP_SAMPLE",
    "agreement",
    "build_report",
    "concentration",
    "write_report",
]

THUMB = 160
MAP_SAMPLE = 200  # images whose maps give the concentration and agreement figures
FAILURES_SHOWN = 20
TOP_SHARE = 0.1  # concentration: the share of a map's mass in its top 10% of tokens
PER_IMAGE = ("probability", "correct")  # the model's values: the same under every method
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;padding:0 16px;
color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}.box{overflow-x:auto;max-width:100%}.path{overflow-wrap:anywhere}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.k,th.k{text-align:left;white-space:normal}#per-image td.k:first-child{min-width:9em}td.path{min-width:12em}.muted{color:#777}.err{color:#b00}
.banner{background:#fef3c7;border:1px solid #d97706;color:#78350f;padding:10px 14px;font-weight:600;margin:12px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #eee;padding:4px;max-width:100%;overflow-x:auto}
table.agreement td{min-width:40px;text-align:center}table.agreement th.col{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left}
table.failures th{text-align:left}
.gallery td,.gallery th{text-align:center;vertical-align:top;font-size:12px}
.gallery td.label{text-align:left;white-space:normal;min-width:120px;max-width:160px}
.gallery img{display:block;margin:auto;max-width:none;height:auto;
width:max(96px,min(160px,calc((min(100vw,1400px) - 200px) / var(--cols,8) - 20px)))}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#555;margin:6px 0;flex-wrap:wrap}
.legend .bar{display:inline-block;width:160px;height:12px;border:1px solid #ccc}
@media (max-width:700px){body{margin:8px auto;padding:0 8px}h1{font-size:18px}}
"""


def _num(v: float, digits: int) -> str:
    """A number to ``digits`` decimals, never ``-0.00`` (a tiny negative rounds to plain 0)."""
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _legend(labels: tuple[str, str, str], what: str, ident: str) -> str:
    """The colour scale of the maps and the matrix (:func:`lnstd.viz.colorize`) as a bar, with its
    low, middle and high labels and what it shows."""
    stops = colorize(np.linspace(0.0, 1.0, 9))
    grad = ", ".join(f"rgb({r},{g},{b}) {100 * k // (len(stops) - 1)}%" for k, (r, g, b) in enumerate(stops))
    lo, mid, hi = (_esc(x) for x in labels)
    return (
        f"<div class='legend' id='{ident}'><span>{_esc(what)}:</span><span>{lo}</span>"
        f"<span class='bar' style='background:linear-gradient(to right, {grad})'></span><span>{hi}</span>"
        f"<span class='muted'>(middle: {mid})</span></div>"
    )


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85, subsampling=0)  # 4:4:4 keeps thin outlines
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(
        f"<th class='k'>{_esc(h)}</th>" if i == 0 else f"<th>{_esc(h)}</th>" for i, h in enumerate(header)
    )
    body = "".join("<tr>" + "".join(rows_i) + "</tr>" for rows_i in rows)
    head = f"<tr>{head}</tr>" if header else ""
    return f"<div class='box'><table class='{cls}'>{head}{body}</table></div>"


def _histogram_svg(values: dict[str, np.ndarray], title: str, bins: int = 20) -> str:
    """Small-multiple histograms (one per key, e.g. per method) on a shared x range, as inline SVG;
    ``title`` is the quantity (the heading above them)."""
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
            f"<text x='{pad}' y='11' font-size='11'>{_esc(method)} (n={len(v)})</text>{bars}"
            f"<text x='{pad}' y='{h - 2}' font-size='9' fill='#777'>{lo:.3g}</text>"
            f"<text x='{w - pad}' y='{h - 2}' font-size='9' fill='#777' text-anchor='end'>{hi:.3g}</text>"
            "</svg></div>"
        )
    return f"<h3>{_esc(title)}</h3><div class='plots'>" + "".join(parts) + "</div>"


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


def _agreement_html(names: list[str], rho: np.ndarray, count: np.ndarray) -> str:
    """The agreement matrix as a table whose cells are coloured by the correlation (-1 to 1)."""
    head = "<tr><th class='k'></th>" + "".join(f"<th class='col'>{_esc(n)}</th>" for n in names) + "</tr>"
    body = []
    for i, a in enumerate(names):
        cells = [f"<th class='k'>{_esc(a)}</th>"]
        for j, b in enumerate(names):
            v = rho[i, j]
            if np.isnan(v):
                cells.append(f"<td data-a='{_esc(a)}' data-b='{_esc(b)}' data-rho='nan'>-</td>")
                continue
            r, g, bl = (int(c) for c in colorize(np.array([(v + 1) / 2]))[0])
            ink = "#fff" if (v + 1) / 2 < 0.55 else "#111"
            cells.append(
                f"<td data-a='{_esc(a)}' data-b='{_esc(b)}' data-rho='{float(v)!r}' data-n='{int(count[i, j])}' "
                f"style='background:rgb({r},{g},{bl});color:{ink}'>{_num(v, 2)}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='box'><table class='agreement' id='agreement'>{head}{''.join(body)}</table></div>"


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
    out = Output(output, opts)
    recorded = out.read_manifest()
    manifest: dict[str, Any] = asdict(recorded) if recorded else (out.read_run() or {})
    config = manifest.get("config") or manifest.get("identity") or {}

    ds = heatmap_dataset(output, opts)
    names = ds.schema.names
    metric_cols = [m for m in column_metrics() if m in names]
    curve_cols = [c for c in names if c.endswith("_curve")]
    base_cols = ["image_id", "method", "status", "source", "target", "predicted"]
    t = ds.to_table(columns=base_cols + metric_cols + curve_cols, filter=pc.field("status") == "ok")
    methods = counts["methods"]
    stat = {(r["method"], r["metric"]): r for r in per_method}

    out = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>lnstd report</title><style>{CSS}</style></head><body>"
    ]
    out.append(f"<h1>lnstd report: <span class='path'>{_esc(output)}</span></h1>")
    out.append(
        f"<p class='muted'>run {_esc(manifest.get('run_id', '?'))}, generated "
        f"{_esc(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>"
    )
    weights = Weights.from_config(config)
    if weights is not None and weights.random:
        out.append(f"<div class='banner' id='random-weights'>{_esc(RANDOM_WEIGHTS)}</div>")

    out.append("<h2>Run</h2>")
    key = [("model", config.get("model", "?")), ("weights", weights.describe() if weights else "?"),
           ("methods", ", ".join(counts["methods"])), ("input", config.get("input", "?"))]  # fmt: skip
    out.append(_table([], [[f"<td class='k'>{_esc(k)}</td>", f"<td class='k path'>{_esc(v)}</td>"]
                                 for k, v in key], "run"))  # fmt: skip
    rows = [
        [f"<td class='k'>{_esc(k)}</td>", f"<td class='k path'>{_esc(json.dumps(v))}</td>"]
        for k, v in config.items()
    ]
    out.append(f"<details><summary>every setting ({len(rows)})</summary>")
    out.append(_table(["setting", "value"], rows))
    if manifest.get("versions"):
        out.append(
            "<p class='muted'>"
            + _esc(", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
            + "</p>"
        )
    out.append("</details>")

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
        out.append("<h3>Errors by reason</h3>")
        out.append(
            _table(
                ["reason", "images"],
                [
                    [f"<td class='k err'>{_esc(e['error'])}</td>", f"<td>{e['images']}</td>"]
                    for e in counts["errors"]
                ],
            )
        )
        failures = _failures(ds, FAILURES_SHOWN)
        out.append(f"<h3>The first {len(failures)} failed images</h3>")
        out.append(
            _table(
                ["image", "source", "reason", "detail"],
                [
                    [
                        f"<td class='k path'>{_esc(f['image_id'])}</td>",
                        f"<td class='k path'>{_esc(f['source'])}</td>",
                        f"<td class='k err'>{_esc(f['error'])}</td>",
                        f"<td class='k path muted'>{_esc(f['error_detail'] or '')}</td>",
                    ]
                    for f in failures
                ],
                "failures",
            )
        )

    out.append(_per_image(t, methods, stat, class_names(config.get("model"), config.get("checkpoint"))))
    sample = _sample_ids(t, methods)
    out.append(_per_method(ds, sample, methods, stat))
    out.append(_agreement_section(ds, sample, methods))
    faithful = [m for m in FAITHFULNESS_METRICS if m in metric_cols and t[m].null_count < t.num_rows]
    if faithful:
        faith_rows = t.select(["image_id", "method", "target", *faithful]).to_pylist()
        out.append(ranking_section(faith_rows, methods))

    method_metrics = [
        m for m in metric_cols if m not in PER_IMAGE and m != "elapsed_ms" and t[m].null_count < t.num_rows
    ]
    if method_metrics:
        out.append("<h2>Distributions per method</h2>")
    for m in method_metrics:
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

    out.append(_gallery(output, ds, t, methods, samples, metric, opts))
    out.append("</body></html>")
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
        return f"{names[c]} ({c})" if names and 0 <= c < len(names) else str(c)

    rows.append(["most predicted classes (images)",
                 ", ".join(f"{name(int(classes[i]))}: {int(n[i])}" for i in order)])  # fmt: skip
    times = [stat[(m, "elapsed_ms")]["mean"] for m in methods if (m, "elapsed_ms") in stat]
    if times:
        rows.append(["time per image, all methods (ms)", f"{sum(times):.1f}"])
    out.append(
        "<div class='box'><table id='per-image'>"
        + "".join(
            f"<tr><td class='k'>{_esc(k)}</td><td class='k' data-key='{_esc(k.split()[0])}'>{_esc(v)}</td></tr>"
            for k, v in rows
        )
        + "</table></div>"
    )
    if len(prob):
        out.append(_histogram_svg({"all images": prob}, "probability of the explained class"))
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
        cells = [f"<td class='k'>{_esc(method)}</td>"]
        r = stat.get((method, "elapsed_ms"))
        cells.append(_stat_cell(method, "elapsed_ms", r, 1))
        for name, vals in (("top_share", share), ("entropy", entropy)):
            v = np.asarray(vals, np.float64)
            v = v[~np.isnan(v)]
            cells.append(
                f"<td data-method='{_esc(method)}' data-stat='{name}' data-mean='{float(v.mean())!r}' "
                f"data-count='{len(v)}'>{_num(v.mean(), 3)} ({len(v)})</td>"
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
    return "<h2>Per method</h2>" + note + _table(header, body, "metrics")


def _stat_cell(method: str, metric: str, r: dict | None, digits: int) -> str:
    if r is None:
        return "<td>-</td>"
    n = int(r["count"])
    if r["std"]:
        value = f"{_num(r['mean'], digits)} ± {_num(r['std'], digits)} ({n})"
    elif metric == "elapsed_ms":  # one batch: every image got the batch's time / its size
        value = f"{_num(r['mean'], digits)} ({n}, one batch)"
    else:
        value = f"{_num(r['mean'], digits)} ({n}, all equal)" if n > 1 else f"{_num(r['mean'], digits)} (1)"
    return (
        f"<td data-method='{_esc(method)}' data-metric='{_esc(metric)}' data-mean='{r['mean']!r}' "
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
        + _legend(("-1", "0", "1"), "cell colour: rank correlation", "legend-agreement")
        + _agreement_html(methods, rho, count)
    )


def _mask_uris(output: str, ids: list[str], opts: storage.StorageOptions) -> dict[str, str]:
    """The mask of each image in ``ids``, from the run's shard plan (empty if it has none)."""
    try:
        plan = Plan.load(Output(output, opts))
        return plan.mask_uris(ids) if plan is not None else {}
    except (OSError, ValueError, KeyError, pa.ArrowException, OutputError, InputError):
        return {}


def _outlined(img: Image.Image, mask: np.ndarray | None) -> Image.Image:
    return img if mask is None else contour(img, mask, width=2)


def _load_mask(source: str, mask_uri: str | None, opts: storage.StorageOptions) -> np.ndarray | None:
    try:
        if ".mat#" in source:
            return read_mat_sample(source)[1]
        return decode_mask(storage.read_bytes(mask_uri, opts)) if mask_uri else None
    except (OSError, ValueError):
        return None


def _gallery(
    output: str,
    ds: pads.Dataset,
    t: pa.Table,
    methods: list[str],
    samples: int,
    metric: str | None,
    opts: storage.StorageOptions,
) -> str:
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
    with_masks = any(c in t.column_names and t[c].null_count < t.num_rows for c in MASK_COLUMNS)
    mask_uris = _mask_uris(output, [i for _, i in chosen], opts) if with_masks else {}
    what = (
        f"{metric} of {ranker}"
        if METRICS[metric].name not in PER_IMAGE
        else f"the model's {metric} (per image)"
    )
    out = [
        f"{head}<p class='muted'>ranked by {_esc(what)}: best, worst and random images"
        + ("; the object's mask outlined in green" if with_masks else "")
        + "</p>"
        + _legend(
            ("least", "half", "most"), "map colour: relevance, each map to its own range", "legend-heatmap"
        )
    ]
    header = "<th class='label'></th>" + "".join(f"<th>{_esc(h)}</th>" for h in ["image", *methods])
    body = []
    for group, image_id in chosen:
        src = next((maps[(image_id, m)]["source"] for m in methods if (image_id, m) in maps), None)
        thumb = _load_thumb(src, opts) if src else None
        cells = [
            f"<td class='label'>{_esc(group)}<br><span class='path'>{_esc(image_id)}</span><br>{_esc(metric)}"
            f"<br>{_num(seen[image_id], 3)}</td>"
        ]
        if thumb is None:
            cells.append("<td class='muted'>source unreadable</td>" + "<td></td>" * len(methods))
        else:
            mask = _load_mask(src, mask_uris.get(image_id), opts) if with_masks else None
            cells.append(
                f"<td><img class='g' alt='{_esc(image_id)}' src='{_img_uri(_outlined(thumb, mask))}'></td>"
            )
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
                pic = _outlined(overlay(thumb, heat, geometry=geom), mask)
                cells.append(f"<td><img class='g' alt='{_esc(m)}' src='{_img_uri(pic)}'></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "".join(out)
        + f"<div class='box'><table class='gallery' style='--cols:{len(methods) + 1}'><tr>{header}</tr>"
        + f"{''.join(body)}</table></div>"
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
