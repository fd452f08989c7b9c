"""How the job's and the aggregate's costs grow with the number of inputs N (issue: the job at 10^8).

For each N, in fresh processes, one after the other:

- ``missing``: ``lnstd run`` over a Parquet manifest of N URIs that do not exist (every row is an
  error row "missing at run time"), so the pipeline without the model is timed: the driver's peak
  RSS (``driver_peak_rss_mb`` of the manifest: VmHWM of the driver process, Ray's own processes
  excluded), the plan's bytes per input in the output, the time from launch to the first committed
  shard, and rows/s of the attribution phase.
- ``symlinks``: the same over a folder of N symlinks to 8 small real JPEGs, so decoding and a tiny
  ViT run too (use small N: the model runs on every image).
- ``aggregate``: ``lnstd aggregate`` over a synthetic output of N heatmap rows (the job's row schema,
  4 methods, random metric values, 16-float heatmaps, parts of 100,000 rows): its peak RSS and rows/s.

Prints one table per mode and the growth of each figure against the smallest N (ratios from one
run: the machine is shared). Examples::

    python benchmarks/bench_scale.py --n 1e4,1e5,1e6                 # all three modes
    python benchmarks/bench_scale.py --mode missing,aggregate --n 1e4,1e7
    python benchmarks/bench_scale.py --mode symlinks --n 1e3,1e4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
LNSTD = [sys.executable, "-m", "lnstd"]
TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "depth=2", "--model-arg", "num_classes=5"]  # fmt: skip


def _manifest(folder: Path, n: int) -> Path:
    """A Parquet manifest of n URIs under a folder that does not exist (written in chunks)."""
    path = folder / "manifest.parquet"
    schema = pa.schema([("uri", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 1_000_000):
            k = np.arange(start, min(n, start + 1_000_000))
            uris = np.char.add(
                np.char.add(str(folder / "missing" / "img-"), np.char.zfill(k.astype(str), 9)), ".jpg"
            )
            w.write_table(pa.table({"uri": pa.array(uris.tolist())}, schema=schema))
    return path


def _symlinks(folder: Path, n: int) -> Path:
    from PIL import Image

    src = folder / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 255, (48 + 8 * k, 64, 3), dtype=np.uint8)).save(src / f"{k}.jpg")
    links = folder / "links"
    for start in range(0, n, 10_000):
        sub = links / f"{start // 10_000:06d}"
        sub.mkdir(parents=True)
        for k in range(start, min(n, start + 10_000)):
            os.symlink(src / f"{k % 8}.jpg", sub / f"{k:09d}.jpg")
    return links


def _run(inp: Path, out: Path, shard_size: int) -> dict:
    """``lnstd run`` in a fresh process; the manifest's figures plus time to the first shard."""
    args = [*LNSTD, "run", "--input", str(inp), "--output", str(out), *TINY, "--methods", "gae",
            "--shard-size", str(shard_size), "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "64",
            "--no-progress", "--no-report"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and any((out / "heatmaps").glob("part-*.parquet")):
            first = time.time() - t0
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"lnstd run failed ({proc.returncode}): {err[-2000:]}")
    m = json.loads((out / "_manifest.json").read_text())
    plan_bytes = sum(p.stat().st_size for p in (out / "_lnstd" / "plan").glob("part-*.arrow"))
    return {
        "driver_mb": m["driver_peak_rss_mb"],
        "plan_b_per_input": plan_bytes / m["counts"]["images"],
        "first_shard_s": first if first is not None else float("nan"),
        "rows_per_s": m["counts"]["images"] / max(m["timings"]["attribution_s"], 1e-9),
        "wall_s": time.time() - t0,
        "images": m["counts"]["images"],
    }


def _synthetic_output(out: Path, n: int) -> None:
    """n heatmap rows in the job's schema: 4 methods per image, metric columns random, parts of 100k."""
    from lnstd import output as layout

    schema = pa.schema(layout.row_fields(pa.list_(pa.float32(), 16)))
    (out / "heatmaps").mkdir(parents=True)
    methods = np.array(["attention", "gae", "lnstd", "rollout"])
    rng = np.random.default_rng(0)
    part_rows = 100_000
    for part, start in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - start)
        img = (start + np.arange(m)) // 4
        status = np.where(img % 50 == 7, "error", "ok")
        ok = status == "ok"
        cols = {f.name: pa.nulls(m, f.type) for f in schema}
        cols.update(
            image_id=pa.array(np.char.add("img-", img.astype(str)).tolist()),
            source=pa.array(np.char.add("/data/img-", img.astype(str)).tolist()),
            method=pa.array(methods[(start + np.arange(m)) % 4].tolist()),
            model=pa.array(["vit"] * m),
            label=pa.array(img % 1000),
            target=pa.array(img % 1000),
            predicted=pa.array((img * 7) % 1000),
            probability=pa.array(rng.random(m, np.float32), mask=~ok),
            correct=pa.array(rng.random(m) < 0.8, mask=~ok),
            foreground_iou=pa.array(rng.random(m, np.float32), mask=~ok),
            pointing_game=pa.array((rng.random(m) < 0.7).astype(np.float32), mask=~ok),
            mass_in_mask=pa.array(rng.random(m, np.float32), mask=~ok),
            elapsed_ms=pa.array(rng.random(m, np.float32) * 10, mask=~ok),
            heatmap=pa.FixedSizeListArray.from_arrays(pa.array(rng.random(m * 16, np.float32)), 16),
            status=pa.array(status.tolist()),
            error=pa.array(np.where(ok, None, "missing at run time").tolist(), pa.string()),
            shard=pa.array(np.full(m, part, np.int32)),
        )
        table = pa.table(cols).cast(schema)
        images = len(np.unique(img))
        errors = len(np.unique(img[~ok]))
        counts = {"images": images, "ok": images - errors, "errors": errors}
        table = table.replace_schema_metadata({layout.SHARD_COUNTS: json.dumps(counts).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        (out / "heatmaps" / layout.part_name(part)).write_bytes(buf.getvalue())


_AGG = """
import sys, time
from lnstd.aggregate import aggregate
from lnstd.sysinfo import peak_rss_mb
t = time.time(); out = aggregate(sys.argv[1], where=sys.argv[2] == "where"); dt = time.time() - t
print(out["counts"]["rows"], dt, peak_rss_mb())
"""


def _aggregate(out: Path) -> dict:
    """The plain aggregate (``--no-where``), then with where the model looks, each in a fresh process."""
    got = {}
    for what, prefix in (("plain", "agg"), ("where", "where")):
        r = subprocess.run([sys.executable, "-c", _AGG, str(out), what], capture_output=True, text=True,
                           check=True)  # fmt: skip
        rows, dt, rss = r.stdout.split()[-3:]
        got.update(
            {
                f"{prefix}_mb": float(rss),
                f"{prefix}_rows_per_s": int(rows) / float(dt),
                f"{prefix}_s": float(dt),
            }
        )
    got["where_extra_mb"] = got["where_mb"] - got["agg_mb"]
    return got


def _table(mode: str, results: list[tuple[int, dict]], keys: list[str]) -> None:
    print(f"\n{mode}")
    print(f"{'N':>12s} " + " ".join(f"{k:>18s}" for k in keys))
    for n, r in results:
        print(f"{n:12,d} " + " ".join(f"{r[k]:18.2f}" for k in keys))
    if len(results) > 1:
        (n0, r0), (n1, r1) = results[0], results[-1]
        growth = ", ".join(f"{k} {r1[k] - r0[k]:+.1f} ({r1[k] / max(r0[k], 1e-9):.2f}x)" for k in keys)
        print(f"N x{n1 / n0:g}: {growth}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1e4,1e5,1e6", help="comma list of N (1e4 style allowed)")
    p.add_argument("--mode", default="missing,symlinks,aggregate")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--symlinks-max", type=float, default=1e4, help="largest N for the symlinks mode")
    p.add_argument("--tmp", default=None, help="scratch folder (default: the temp folder)")
    a = p.parse_args()
    ns = [int(float(x)) for x in a.n.split(",")]
    modes = a.mode.split(",")
    for mode in modes:
        results = []
        for n in ns:
            if mode == "symlinks" and n > a.symlinks_max:
                continue
            work = Path(tempfile.mkdtemp(prefix="lnstd-bench-scale-", dir=a.tmp))
            try:
                if mode == "aggregate":
                    _synthetic_output(work / "out", n)
                    results.append((n, _aggregate(work / "out")))
                else:
                    inp = _manifest(work, n) if mode == "missing" else _symlinks(work, n)
                    results.append((n, _run(inp, work / "out", a.shard_size)))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"  {mode} N={n:,d}: {results[-1][1]}", file=sys.stderr, flush=True)
        keys = (
            ["agg_mb", "agg_rows_per_s", "agg_s", "where_mb", "where_extra_mb", "where_rows_per_s", "where_s"]
            if mode == "aggregate"
            else ["driver_mb", "plan_b_per_input", "first_shard_s", "rows_per_s", "wall_s"]
        )
        _table(mode, results, keys)


if __name__ == "__main__":
    main()
