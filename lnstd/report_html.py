"""The report page's building blocks: its style sheet, escaping, tables, inline pictures, legends and
SVG plots (every picture a data: URI, no network request)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from PIL import Image

from .viz import colorize

__all__ = [
    "CSS",
    "agreement_html",
    "curve_svg",
    "esc",
    "faithfulness_svg",
    "histogram_svg",
    "img_uri",
    "legend",
    "num",
    "table",
]


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
.gallery img,.gallery svg.faith{display:block;margin:auto;max-width:none;height:auto;
width:max(96px,min(160px,calc((min(100vw,1400px) - 200px) / var(--cols,8) - 20px)))}
.gallery svg.faith{margin-top:2px;border:1px solid #eee}
.where-map{width:64px;height:64px;image-rendering:pixelated;display:block;margin:auto}
.where-cards{display:flex;flex-wrap:wrap;gap:8px}.where-card{border:1px solid #eee;padding:4px;font-size:12px}
.where-card table{margin:0 0 2px}.where-card td{border:0;padding:1px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#555;margin:6px 0;flex-wrap:wrap}
.legend .bar{display:inline-block;width:160px;height:12px;border:1px solid #ccc}
@media (max-width:700px){body{margin:8px auto;padding:0 8px}h1{font-size:18px}}
"""


def num(v: float, digits: int) -> str:
    """A number to ``digits`` decimals, never ``-0.00`` (a tiny negative rounds to plain 0)."""
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def legend(labels: tuple[str, str, str], what: str, ident: str) -> str:
    """The colour scale of the maps and the matrix (:func:`lnstd.viz.colorize`) as a bar, with its
    low, middle and high labels and what it shows."""
    stops = colorize(np.linspace(0.0, 1.0, 9))
    grad = ", ".join(f"rgb({r},{g},{b}) {100 * k // (len(stops) - 1)}%" for k, (r, g, b) in enumerate(stops))
    lo, mid, hi = (esc(x) for x in labels)
    return (
        f"<div class='legend' id='{ident}'><span>{esc(what)}:</span><span>{lo}</span>"
        f"<span class='bar' style='background:linear-gradient(to right, {grad})'></span><span>{hi}</span>"
        f"<span class='muted'>(middle: {mid})</span></div>"
    )


def esc(x: Any) -> str:
    return html.escape(str(x))


def img_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85, subsampling=0)  # 4:4:4 keeps thin outlines
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(
        f"<th class='k'>{esc(h)}</th>" if i == 0 else f"<th>{esc(h)}</th>" for i, h in enumerate(header)
    )
    body = "".join("<tr>" + "".join(rows_i) + "</tr>" for rows_i in rows)
    head = f"<tr>{head}</tr>" if header else ""
    return f"<div class='box'><table class='{cls}'>{head}{body}</table></div>"


def histogram_svg(values: dict[str, np.ndarray], title: str, bins: int = 20) -> str:
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
            f"<div class='plot'><svg width='{w}' height='{h}' role='img' aria-label='{esc(title)} {esc(method)}'>"
            f"<text x='{pad}' y='11' font-size='11'>{esc(method)} (n={len(v)})</text>{bars}"
            f"<text x='{pad}' y='{h - 2}' font-size='9' fill='#777'>{lo:.3g}</text>"
            f"<text x='{w - pad}' y='{h - 2}' font-size='9' fill='#777' text-anchor='end'>{hi:.3g}</text>"
            "</svg></div>"
        )
    return f"<h3>{esc(title)}</h3><div class='plots'>" + "".join(parts) + "</div>"


def curve_svg(curves: dict[str, np.ndarray], title: str) -> str:
    """Mean curve per method (x = the curve's steps, evenly spaced: the fraction of pixels removed or
    ROAD's percentiles), as inline SVG."""
    w, h, pad = 320, 180, 24
    colours = ["#c2410c", "#1d4ed8", "#15803d", "#7e22ce", "#a16207", "#0f766e"]
    lines, keys = [], []
    top = max(float(np.nanmax(c)) for c in curves.values()) or 1.0
    for k, (method, c) in enumerate(curves.items()):
        xs = np.linspace(pad, w - pad, len(c))
        ys = h - pad - c / top * (h - 2 * pad)
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
        col = colours[k % len(colours)]
        lines.append(f"<polyline fill='none' stroke='{col}' stroke-width='2' points='{pts}'/>")
        keys.append(
            f"<text x='{w - pad}' y='{14 + 12 * k}' font-size='10' fill='{col}' text-anchor='end'>{esc(method)}</text>"
        )
    return (
        f"<div class='plot'><svg width='{w}' height='{h}' role='img' aria-label='{esc(title)}'>"
        f"<text x='{pad}' y='12' font-size='11'>{esc(title)}</text>{''.join(lines)}{''.join(keys)}</svg></div>"
    )


# The faithfulness curves of one map: (column, colour, dashed)
FAITH_LINES = (
    ("deletion_curve", "#b91c1c", False),
    ("insertion_curve", "#1d4ed8", False),
    ("road_morf_curve", "#b91c1c", True),
    ("road_lerf_curve", "#1d4ed8", True),
)
FAITH_LEGEND = (
    "under each map, the model's probability of the explained class (0 to 1) as a share of the pixels, "
    "most relevant first, is deleted (red) or inserted (blue) from 0 to 100%; dashed: ROAD's imputation "
    "of the most (red) and least (blue) relevant pixels at 10 to 90%. A faithful map: red falls fast, "
    "blue rises fast"
)


def faithfulness_svg(row: dict[str, Any], image_id: str, method: str) -> str:
    """One map's faithfulness curves (the ``--faithfulness`` list columns of its row, see
    :data:`FAITH_LINES`) as a small inline SVG, y = probability in [0, 1], each curve spread over the
    width; "" when the row has none. Its title holds the figures."""
    lines = []
    for col, colour, dashed in FAITH_LINES:
        curve = row.get(col)
        if not curve:
            continue
        xs = np.linspace(0.0, 100.0, len(curve))
        pts = " ".join(
            f"{x:.2f},{100.0 - 100.0 * min(max(float(v), 0.0), 1.0):.2f}"
            for x, v in zip(xs, curve, strict=True)
        )
        dash = " stroke-dasharray='4 3'" if dashed else ""
        lines.append(
            f"<polyline data-curve='{col}' fill='none' stroke='{colour}' stroke-width='2'{dash} "
            f"vector-effect='non-scaling-stroke' points='{pts}'/>"
        )
    if not lines:
        return ""
    figures = ", ".join(
        f"{name} {num(row[name], 3)}"
        for name in ("deletion_auc", "insertion_auc", "road_gap")
        if row.get(name) is not None
    )
    return (
        f"<svg class='faith' viewBox='0 0 100 100' preserveAspectRatio='none' role='img' "
        f"data-image='{esc(image_id)}' data-method='{esc(method)}' aria-label='{esc(method)}: {esc(figures)}'>"
        f"<title>{esc(method)}: {esc(figures)}</title>{''.join(lines)}</svg>"
    )


def agreement_html(names: list[str], rho: np.ndarray, count: np.ndarray) -> str:
    """The agreement matrix as a table whose cells are coloured by the correlation (-1 to 1)."""
    head = "<tr><th class='k'></th>" + "".join(f"<th class='col'>{esc(n)}</th>" for n in names) + "</tr>"
    body = []
    for i, a in enumerate(names):
        cells = [f"<th class='k'>{esc(a)}</th>"]
        for j, b in enumerate(names):
            v = rho[i, j]
            if np.isnan(v):
                cells.append(f"<td data-a='{esc(a)}' data-b='{esc(b)}' data-rho='nan'>-</td>")
                continue
            r, g, bl = (int(c) for c in colorize(np.array([(v + 1) / 2]))[0])
            ink = "#fff" if (v + 1) / 2 < 0.55 else "#111"
            cells.append(
                f"<td data-a='{esc(a)}' data-b='{esc(b)}' data-rho='{float(v)!r}' data-n='{int(count[i, j])}' "
                f"style='background:rgb({r},{g},{bl});color:{ink}'>{num(v, 2)}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='box'><table class='agreement' id='agreement'>{head}{''.join(body)}</table></div>"
