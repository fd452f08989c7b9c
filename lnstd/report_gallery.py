"""The report's gallery: the best, worst and random images of a run with every method's map over
them, thumbnails read from the run's sources (and masks from its plan)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from PIL import Image

from . import storage
from .data import mat_ref, read_mat_sample
from .data.decode import decode_image, decode_mask
from .data.preprocess import Geometry
from .errors import InputError, OutputError
from .metrics.mask import MASK_METRICS as MASK_COLUMNS
from .metrics.registry import FAITHFULNESS_CURVES as FAITH_COLUMNS
from .metrics.registry import FAITHFULNESS_METRICS, METRICS, higher_is_better
from .output import Output
from .plan import Plan
from .report_html import FAITH_LEGEND, esc, faithfulness_svg, img_uri, legend, num
from .viz import contour, overlay

__all__ = ["PER_IMAGE", "THUMB", "gallery"]

THUMB = 160
PER_IMAGE = ("probability", "correct")  # the model's values: the same under every method


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


def gallery(
    output: str,
    ds: pads.Dataset,
    t: pa.Table,
    methods: list[str],
    samples: int,
    metric: str | None,
    opts: storage.StorageOptions,
) -> str:
    """The gallery: the best, worst and random images by ``metric`` (of ``lnstd``'s maps, or the
    first method's), each with every method's map over it; masks outlined when the output has them."""
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
    chosen, seen = _choose(t, ranker, metric, samples)
    if not seen:
        return head + f"<p class='muted'>no image has a {esc(metric)} value to rank by</p>"
    maps = _maps_of(ds, [i for _, i in chosen])
    with_curves = any(row.get(c) for row in maps.values() for c in FAITH_COLUMNS)
    with_masks = any(c in t.column_names and t[c].null_count < t.num_rows for c in MASK_COLUMNS)
    mask_uris = _mask_uris(output, [i for _, i in chosen], opts) if with_masks else {}
    per_image = METRICS[metric].name in PER_IMAGE
    what = f"the model's {metric} (per image)" if per_image else f"{metric} of {ranker}"
    intro = (
        f"{head}<p class='muted'>ranked by {esc(what)}: best, worst and random images"
        + ("; the object's mask outlined in green" if with_masks else "")
        + "</p>"
        + legend(
            ("least", "half", "most"), "map colour: relevance, each map to its own range", "legend-heatmap"
        )
        + (f"<p class='muted' id='legend-faithfulness'>{esc(FAITH_LEGEND)}</p>" if with_curves else "")
    )
    header = "<th class='label'></th>" + "".join(f"<th>{esc(h)}</th>" for h in ["image", *methods])
    body = []
    for group, image_id in chosen:
        label = (
            f"<td class='label'>{esc(group)}<br><span class='path'>{esc(image_id)}</span><br>{esc(metric)}"
            f"<br>{num(seen[image_id], 3)}</td>"
        )
        mask_uri = mask_uris.get(image_id) if with_masks else None
        body.append("<tr>" + label + _pictures(image_id, methods, maps, mask_uri, with_masks, opts) + "</tr>")
    return (
        intro
        + f"<div class='box'><table class='gallery' style='--cols:{len(methods) + 1}'><tr>{header}</tr>"
        + f"{''.join(body)}</table></div>"
    )


def _choose(
    t: pa.Table, ranker: str, metric: str, samples: int
) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """(group, image id) of the images to show, and each ranked image's value."""
    r = t.filter(pc.and_(pc.equal(t["method"], ranker), pc.is_valid(t[metric])))
    # Prefer the rows that explain the prediction; a run of --target label with a weak model may
    # have none, and then every row counts.
    agree = r.filter(pc.equal(r["target"], r["predicted"])) if r.num_rows else r
    r = agree if agree.num_rows else r
    seen: dict[str, float] = {}
    for i, v in zip(r["image_id"].to_pylist(), pc.cast(r[metric], pa.float64()).to_numpy(), strict=True):
        seen.setdefault(i, float(v))
    order = sorted(seen, key=seen.__getitem__, reverse=higher_is_better(metric))
    k = max(1, samples // 3)
    best = order[:k]
    worst = [i for i in order[::-1][:k] if i not in best]
    rest = [i for i in order if i not in best and i not in worst]
    n_rand = min(max(samples - len(best) - len(worst), 0), len(rest))
    rand = [rest[j] for j in sorted(np.random.default_rng(0).choice(len(rest), size=n_rand, replace=False))]
    return [("best", i) for i in best] + [("worst", i) for i in worst] + [("random", i) for i in rand], seen


def _maps_of(ds: pads.Dataset, ids: list[str]) -> dict[tuple[str, str], dict]:
    """(image id, method) -> its row with the map (the predicted class's when there are several)."""
    cols = ["image_id", "method", "source", "heatmap", "grid_h", "grid_w", "target", "predicted"]
    cols += [
        c
        for c in ("width", "height", "crop_box", *FAITHFULNESS_METRICS, *FAITH_COLUMNS)
        if c in ds.schema.names
    ]
    rows = ds.to_table(columns=cols, filter=pc.field("image_id").isin(ids) & (pc.field("status") == "ok"))
    maps: dict[tuple[str, str], dict] = {}
    for row in rows.to_pylist():
        key = (row["image_id"], row["method"])
        if key not in maps or row["target"] == row["predicted"]:
            maps[key] = row
    return maps


def _pictures(
    image_id: str,
    methods: list[str],
    maps: dict[tuple[str, str], dict],
    mask_uri: str | None,
    with_masks: bool,
    opts: storage.StorageOptions,
    cls: str = "g",
) -> str:
    """One gallery row's cells: the image (its mask outlined), then each method's map over it; its
    pictures of class ``cls`` (``g``: the main gallery's)."""
    src = next((maps[(image_id, m)]["source"] for m in methods if (image_id, m) in maps), None)
    thumb = _load_thumb(src, opts) if src else None
    if thumb is None:
        return "<td class='muted'>source unreadable</td>" + "<td></td>" * len(methods)
    mask = _load_mask(src, mask_uri, opts) if with_masks and src else None
    cells = [f"<td><img class='{cls}' alt='{esc(image_id)}' src='{img_uri(_outlined(thumb, mask))}'></td>"]
    for m in methods:
        row = maps.get((image_id, m))
        if row is None:
            cells.append("<td></td>")
            continue
        heat = torch.tensor(row["heatmap"], dtype=torch.float32).reshape(row["grid_h"], row["grid_w"])
        crop = row.get("crop_box")
        geom = Geometry(row["width"], row["height"], tuple(crop)) if crop is not None else None
        pic = _outlined(overlay(thumb, heat, geometry=geom), mask)
        curves = faithfulness_svg(row, image_id, m)
        cells.append(f"<td><img class='{cls}' alt='{esc(m)}' src='{img_uri(pic)}'>{curves}</td>")
    return "".join(cells)
