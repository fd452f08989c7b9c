"""``lnstd aggregate`` streams: its figures equal NumPy's over the same rows, whatever the batching,
and it never imports torch (its memory is the rows' columns it needs, not a model library)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lnstd import aggregate as agg_module
from lnstd import output as layout
from lnstd.aggregate import aggregate


def _write_output(out, parts: int = 3, per_part: int = 900, seed: int = 0) -> list[dict]:
    """A run's output written by hand in the job's schema: 3 methods per image, labels 0..6,
    some error images, a label-less image, metric values with nulls; returns every row."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(layout.row_fields(pa.list_(pa.float32(), 4)))
    (out / "heatmaps").mkdir(parents=True)
    everything = []
    img = 0
    for part in range(parts):
        rows = []
        images = errors = 0
        for _ in range(per_part // 3):
            bad = rng.random() < 0.1
            label = None if rng.random() < 0.05 else int(rng.integers(0, 7))
            images += 1
            errors += bad
            for method in ("gae", "lnstd", "transformer_attribution"):
                row = {"image_id": f"i{img}", "source": f"/d/i{img}.png", "method": method, "model": "m",
                       "label": label, "target": 3, "shard": part, "status": "error" if bad else "ok",
                       "error": (("corrupt or truncated image" if img % 2 else "missing at run time")
                                 if bad else None)}  # fmt: skip
                if not bad:
                    row["probability"] = float(rng.random())
                    row["correct"] = bool(rng.random() < 0.7) if label is not None else None
                    row["elapsed_ms"] = float(rng.gamma(2.0, 30.0))
                    if rng.random() < 0.8:
                        row["foreground_iou"] = float(rng.random())
                        row["mass_in_mask"] = float(rng.normal(0.5, 2.0))  # negative values too
                rows.append(row)
            img += 1
        table = pa.Table.from_pylist(rows, schema=schema)
        counts = {"images": images, "ok": images - errors, "errors": errors}
        table = table.replace_schema_metadata({layout.SHARD_COUNTS: json.dumps(counts).encode()})
        pq.write_table(table, out / "heatmaps" / layout.part_name(part), row_group_size=257)
        everything.extend(table.to_pylist())
    return everything


@pytest.mark.parametrize("batch_rows", [64, 1 << 17])
def test_streamed_figures_equal_numpy_over_all_rows(tmp_path, monkeypatch, batch_rows):
    rows = _write_output(tmp_path / "out")
    monkeypatch.setattr(agg_module, "BATCH_ROWS", batch_rows)
    out = aggregate(str(tmp_path / "out"))
    ok = [r for r in rows if r["status"] == "ok"]
    per_method = {(r["method"], r["metric"]): r for r in out["per_method"].to_pylist()}
    per_class = {(r["method"], r["class"], r["metric"]): r for r in out["per_class"].to_pylist()}
    n_checked = 0
    for (method, metric), r in per_method.items():
        v = np.array([float(x[metric]) for x in ok if x["method"] == method and x[metric] is not None])
        assert r["count"] == len(v) and r["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
        assert r["std"] == pytest.approx(v.std(), rel=1e-9) and (r["min"], r["max"]) == (v.min(), v.max())
        # a middle value: between the two middle order statistics, up to the bin's width (0.35%)
        lo, hi = np.sort(v)[[(len(v) - 1) // 2, len(v) // 2]]
        assert lo - 0.0035 * abs(lo) - 1e-6 <= r["median"] <= hi + 0.0035 * abs(hi) + 1e-6
        n_checked += 1
    assert n_checked == 3 * 5  # probability, correct, foreground_iou, mass_in_mask, elapsed_ms
    for (method, cls, metric), r in per_class.items():
        v = np.array([float(x[metric]) for x in ok
                      if x["method"] == method and x["label"] == cls and x[metric] is not None])  # fmt: skip
        assert r["count"] == len(v) and r["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
        assert r["std"] == pytest.approx(v.std(), rel=1e-9, abs=1e-12)
    assert {c for _, c, _ in per_class} == set(range(7))  # the label, not the target (3)
    c = out["counts"]
    ids = {r["image_id"] for r in rows}
    bad = {r["image_id"] for r in rows if r["status"] == "error"}
    assert (c["images"], c["error_images"], c["ok_images"]) == (len(ids), len(bad), len(ids) - len(bad))
    assert c["rows"] == len(rows) and c["shards"] == 3
    assert c["methods"] == ["gae", "lnstd", "transformer_attribution"]
    by_reason = {e["error"]: e["images"] for e in c["errors"]}
    for reason, n in by_reason.items():
        assert n == len({r["image_id"] for r in rows if r["error"] == reason})
    assert (tmp_path / "out" / "_aggregate" / "summary.csv").exists()


def test_median_of_a_two_valued_column_is_exact(tmp_path):
    """A 0/1 column's median is one of its values (the median's bin holds one value)."""
    rows = _write_output(tmp_path / "out", parts=1, per_part=300, seed=3)
    out = aggregate(str(tmp_path / "out"), write=False)
    for r in out["per_method"].to_pylist():
        if r["metric"] == "correct":
            v = [float(x["correct"]) for x in rows if x["method"] == r["method"] and x["correct"] is not None]
            assert r["median"] == np.median(v)
    assert not (tmp_path / "out" / "_aggregate").exists()  # write=False writes nothing


def test_aggregate_does_not_import_torch(tmp_path):
    _write_output(tmp_path / "out", parts=1, per_part=30)
    code = (
        "import sys; from lnstd.aggregate import aggregate; "
        f"aggregate({str(tmp_path / 'out')!r}); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_parts_without_footer_counts_are_counted_from_their_rows(tmp_path):
    rows = _write_output(tmp_path / "out", parts=1, per_part=60)
    path = tmp_path / "out" / "heatmaps" / layout.part_name(0)
    table = pq.read_table(path).replace_schema_metadata(None)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path.write_bytes(buf.getvalue())
    c = aggregate(str(tmp_path / "out"), write=False)["counts"]
    assert c["images"] == len({r["image_id"] for r in rows})
    assert c["error_images"] == len({r["image_id"] for r in rows if r["status"] == "error"})


def test_the_counts_say_whether_the_totals_are_partial(tmp_path):
    """Without _SUCCESS (a run still writing, or one that did not finish) the totals are partial,
    and the counts say so."""
    out = tmp_path / "out"
    _write_output(out, parts=1, per_part=10)
    assert aggregate(str(out), write=False)["counts"]["complete"] is False
    (out / "_SUCCESS").write_bytes(b"")
    assert aggregate(str(out), write=False)["counts"]["complete"] is True
