"""Throughput of the whole job (``lnstd run``: Ray, decode, attribution, Parquet writes) over bare
``lnstd.Explainer`` on the same images and model, and peak memory; ratios measured in one run.

    python benchmarks/bench_job.py                 # 256 generated images, vit_small, CPU
    python benchmarks/bench_job.py --images 1024 --model swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import lnstd
from lnstd.data import decode_image
from lnstd.sysinfo import peak_rss_mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--methods", default="gae,lnstd")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--cpus-per-actor", type=float, default=float(os.cpu_count() or 1))
    args = p.parse_args()
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="lnstd-bench-job-"))
    rng = np.random.default_rng(0)
    (work / "in").mkdir()
    payloads = []
    for i in range(args.images):  # photo-like sizes, JPEG: decoding is part of the job's work
        w, h = int(rng.integers(300, 640)), int(rng.integers(240, 480))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (work / "in" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        payloads.append(buf.getvalue())
    torch.manual_seed(0)
    model = lnstd.load_model(args.model)
    ckpt = work / "model.safetensors"
    save_file(model.state_dict(), ckpt)

    # Bare: decode + preprocess + explain in one process, batch by batch (what a script would do).
    torch.set_num_threads(max(1, int(args.cpus_per_actor)))
    tf = lnstd.transform_for(model)
    ex = lnstd.Explainer(model, methods)
    h, w = lnstd.models.input_size(model)
    t0 = time.perf_counter()
    for k in range(0, len(payloads), args.batch_size):
        x = torch.stack([tf(decode_image(b, min_size=(w, h))[0]) for b in payloads[k : k + args.batch_size]])
        ex(x)
    bare_s = time.perf_counter() - t0
    bare_rss = peak_rss_mb()

    cmd = [sys.executable, "-m", "lnstd", "run", "--input", str(work / "in"), "--output", str(work / "out"),
           "--model", args.model, "--checkpoint", str(ckpt), "--methods", args.methods,
           "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
           "--cpus-per-actor", str(args.cpus_per_actor), "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    job_wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    m = json.loads((work / "out" / "manifest.json").read_text())
    attr_s = m["timings"]["attribution_s"]
    n = args.images
    print(f"{args.model}, methods {args.methods}, {n} JPEG images, batch {args.batch_size}, CPU threads "
          f"{int(args.cpus_per_actor)}")  # fmt: skip
    print(f"bare Explainer (decode+preprocess+explain, one process): {n / bare_s:.2f} img/s")
    print(f"job, attribution phase (actors ready -> last shard committed): {n / attr_s:.2f} img/s "
          f"= {bare_s / attr_s:.2f}x bare")  # fmt: skip
    print(f"job, whole command incl. interpreter and Ray start-up: {n / job_wall:.2f} img/s "
          f"= {bare_s / job_wall:.2f}x bare")  # fmt: skip
    print(f"peak RSS: job driver {m['driver_peak_rss_mb']:.0f} MB, actor {m['actor_peak_rss_mb']:.0f} MB, "
          f"bare process {bare_rss:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
