"""The report's "Where the model looks" section: per class, the mean map (thumbnails) and the classes
whose relevance sits most on the border ring or off the object; the images whose maps lie farthest
from their class's usual place, and (with masks) those with the least relevance in their object.
Its figures are ``lnstd aggregate``'s (lnstd/looks.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.dataset as pads
from PIL import Image

from . import storage
from .looks import GRID, RING_AREA, Where, shown_classes
from .report_gallery import _maps_of, _pictures
from .report_html import esc, img_uri, legend, num
from .viz import colorize

__all__ = ["where_section"]

SHOWN = 12  # classes in the table (with their mean maps)
CARDS = 8  # images per gallery


def where_section(
    ds: pads.Dataset,
    where: Where,
    methods: list[str],
    name: Callable[[int], str],
    opts: storage.StorageOptions,
) -> str:
    """The section's HTML for the first of ``methods`` that is ``lnstd`` or else the first; "" when no
    map counted for a class."""
    rows = where.classes.to_pylist()
    if not rows or not methods:
        return ""
    method = "lnstd" if "lnstd" in methods else methods[0]
    kind, mine = shown_classes(rows, method)
    if not mine:
        return ""
    with_mask = any(r["in_mask"] is not None for r in mine)
    by_border = sorted(mine, key=lambda r: (-r["border_share"], r["class"]))[:SHOWN]
    what = "true class" if kind == "label" else "predicted class"
    out = [
        "<h2 id='where'>Where the model looks</h2>",
        f"<p class='muted'>{esc(method)}'s maps, each scaled to its own range and resized to a "
        f"{GRID}&times;{GRID} grid, averaged per {what} (maps that explain it). The border ring is the "
        f"outer cell on each side, {100 * RING_AREA:.0f}% of the image: the share a uniform map puts there. "
        "Distance: the share of an image's relevance that would have to move to match its class's mean "
        "map (0 to 1).</p>",
    ]
    head = [
        "class",
        "images",
        "on the border",
        *(["in the object"] if with_mask else []),
        "distance",
        "mean map",
    ]
    body = []
    for r in by_border:
        cells = [
            f"<td class='k'>{esc(name(r['class']))}</td>",
            f"<td>{r['images']}</td>",
            f"<td data-border='{r['border_share']:.6f}'>{100 * r['border_share']:.0f}%</td>",
        ]
        if with_mask:
            inside = "-" if r["in_mask"] is None else f"{100 * r['in_mask']:.0f}%"
            cells.append(f"<td>{inside}</td>")
        cells.append(f"<td>{num(r['distance'], 3)}</td>")
        cells.append(f"<td><img class='where-map' alt='mean map of {esc(name(r['class']))}' "
                     f"src='{img_uri(_thumb(r['map']))}'></td>")  # fmt: skip
        body.append(f"<tr data-class='{r['class']}'>" + "".join(cells) + "</tr>")
    out.append(
        f"<h3>Classes by the share of relevance on the border ({len(by_border)} of {len(mine)})</h3>"
        + legend(
            ("least", "half", "most"), "mean map colour: relevance, each map to its own range", "legend-where"
        )
        + "<div class='box'><table id='where-classes'><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join(body)
        + "</table></div>"
    )
    if with_mask:
        off = sorted((r for r in mine if r["in_mask"] is not None), key=lambda r: (r["in_mask"], r["class"]))
        out.append(
            "<p>Most off the object: "
            + ", ".join(f"{esc(name(r['class']))} ({100 * (1 - r['in_mask']):.0f}% outside)" for r in off[:5])
            + "</p>"
        )
    out.append(_images(ds, where.far.get(method, []), method, "farthest from their class's usual place",
                       "distance", name, opts))  # fmt: skip
    out.append(_images(ds, where.border.get(method, []), method, "with the most relevance on the border",
                       "on the border", name, opts))  # fmt: skip
    if with_mask:
        out.append(_images(ds, where.off.get(method, []), method, "with the least relevance in their object",
                           "outside", name, opts))  # fmt: skip
    return "<section id='where-section'>" + "".join(out) + "</section>"


def _thumb(values: str, size: int = 64) -> Image.Image:
    m = np.array([float(v) for v in values.split(";")]).reshape(GRID, GRID)
    span = m.max() - m.min()
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    return Image.fromarray(colorize(m)).resize((size, size), Image.NEAREST)


def _images(
    ds: pads.Dataset,
    ranked: list[tuple[float, str, int]],
    method: str,
    title: str,
    figure: str,
    name: Callable[[int], str],
    opts: storage.StorageOptions,
) -> str:
    """A gallery of ``ranked`` (value, image id, class): cards of the image and its map, wrapping."""
    ranked = ranked[:CARDS]
    if not ranked:
        return ""
    maps = _maps_of(ds, [i for _, i, _ in ranked])
    cards = []
    for value, image_id, cls in ranked:
        pictures = _pictures(image_id, [method], maps, None, False, opts, cls="w")
        cards.append(
            f"<div class='where-card'><table class='gallery where-gallery' style='--cols:8'>"
            f"<tr data-image='{esc(image_id)}'>{pictures}</tr></table>"
            f"<div class='path'>{esc(image_id)}</div>"
            f"<div>{esc(name(cls))}, {esc(figure)} {num(value, 3)}</div></div>"
        )
    return (
        f"<h3>Images {esc(title)} (image, then {esc(method)}'s map)</h3>"
        f"<div class='where-cards'>{''.join(cards)}</div>"
    )
