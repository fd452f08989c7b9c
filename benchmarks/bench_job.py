"""Throughput of the whole job (``lnstd run``: Ray, decode, attribution, Parquet writes) over bare
``lnstd.Explainer`` on the same photo-like JPEGs, model, decoder and Explainer settings, with peak
memory and, on a GPU, how busy the GPU was; ratios measured in one run.

The bare baseline does what the job's actor does, in one process without Ray or Parquet: it reads
and decodes the next batch on a pool of ``--cpus-per-actor`` threads while the model explains the
current one, with the same decoder (``--decode cpu``: PIL with JPEG draft, as the actor; ``gpu``:
headers on the threads, pixels batch-decoded by nvjpeg, ``lnstd.data.gpu.decode_on_gpu``), the same
``Preprocess`` and the same ``Explainer`` (methods, precision, capture), and takes the heatmaps to
host memory as the job's write step does.

    python benchmarks/bench_job.py                    # 256 images (about 500x375), vit_small, CPU
    python benchmarks/bench_job.py --images 2048 --model vit_base_patch16_224 --gpus-per-actor 1 \\
        --cpus-per-actor 16 --batch-size 64 --shard-size 512 --decode cpu,gpu     # a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import parse_size, write_photos

import lnstd
from lnstd import output as layout
from lnstd.data.decode import jpeg_header
from lnstd.data.preprocess import Geometry, Preprocess
from lnstd.sysinfo import peak_rss_mb


class GpuBusy:
    """Samples the GPU's utilisation (percent of time a kernel was running, as NVML reports it) on a
    thread: NVML through ``pynvml`` where importable, else ``nvidia-smi`` in loop mode."""

    def __init__(self, index: int = 0, period_s: float = 0.05) -> None:
        self.index, self.period_s = index, period_s
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self.source = "none"

    def start(self) -> GpuBusy:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "NVML"

            def poll() -> None:
                while not self._stop.is_set():
                    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    self.samples.append((time.time(), float(util)))
                    self._stop.wait(self.period_s)

        except Exception:  # no pynvml, or NVML refuses: nvidia-smi's own loop
            if shutil.which("nvidia-smi") is None:
                return self
            self.source = "nvidia-smi"
            ms = max(100, int(self.period_s * 1000))
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", f"-lms={ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip

            def poll() -> None:
                for line in self._proc.stdout:
                    if line.strip().isdigit():
                        self.samples.append((time.time(), float(line)))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fraction(self, t0: float, t1: float) -> float | None:
        """Mean busy fraction (0..1) of the samples taken between wall times t0 and t1."""
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.mean(inside) / 100.0 if inside else None


def actor_peak_rss(stop: threading.Event, found: list[float], period_s: float = 0.5) -> None:
    """Largest peak RSS (VmHWM, MiB) of the job's actor processes (``ray::ShardWorker``), polled from
    /proc until ``stop``: the manifest records the driver's peak only. Linux only."""
    while not stop.wait(period_s):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if b"ShardWorker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        found.append(int(line.split()[1]) / 1024)
            except OSError:  # gone meanwhile
                continue


@dataclass
class Rec:
    """What the actor's ``Loaded`` holds for ``decode_on_gpu``."""

    raw: bytes | None
    geometry: Geometry | None
    tensor: torch.Tensor | None = None
    error: str | None = None
    detail: str | None = None


def bare(paths: list[Path], model, args, decode: str, device: torch.device) -> tuple[float, float]:
    """(wall-clock start, seconds) of decode + preprocess + explain of every image, pipelined as the
    actor does, after a warm-up batch."""
    threads = max(1, round(args.cpus_per_actor))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    prep = Preprocess.for_model(model, args.fit)
    ex = lnstd.Explainer(model, args.methods.split(","), precision=args.precision, capture=args.capture)

    def load(path: Path) -> Rec:
        data = path.read_bytes()
        header = jpeg_header(data) if decode == "gpu" else None
        if header is not None and header[2]:
            return Rec(data, prep.geometry(header[0], header[1]))
        tensor, geom = prep.load(data)
        return Rec(None, geom, tensor)

    def explain(recs: list[Rec]) -> None:
        if decode == "gpu":
            from lnstd.data.gpu import decode_on_gpu

            decode_on_gpu(recs, prep, device)
        if device.type == "cpu":
            x = torch.stack([r.tensor for r in recs])
        elif all(r.tensor.device.type == "cpu" for r in recs):
            x = torch.stack([r.tensor for r in recs]).pin_memory().to(device, non_blocking=True)
        else:
            x = torch.stack([r.tensor.to(device, non_blocking=True) for r in recs])
        out = ex(x)
        for h in out.heatmaps.values():  # the write step's one crossing to host memory
            h.cpu()

    explain([load(p) for p in paths[: min(2, len(paths))]])  # warm-up (cuDNN, nvjpeg, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    size = args.batch_size
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(max(2, threads)) as pool:
        start, t0 = time.time(), time.perf_counter()
        pending: list[Future] = [pool.submit(load, p) for p in chunks[0]]
        for k in range(len(chunks)):
            nxt = [pool.submit(load, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            explain([f.result() for f in pending])
            pending = nxt
        if device.type == "cuda":
            torch.cuda.synchronize()
        return start, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--methods", default="gae,lnstd")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", default="imagenet", help="imagenet (a mix about 500x375) or WxH")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--cpus-per-actor", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="> 0: the actor and bare run on CUDA")
    p.add_argument("--decode", default="cpu", help="cpu, gpu or both (cpu,gpu): a bare and a job run each")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--capture", choices=["fused", "unfused"], default=None)
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize")
    p.add_argument("--timeout", type=float, default=None, help="seconds for each job command")
    args = p.parse_args()
    decodes = args.decode.split(",")
    if args.gpus_per_actor > 0 and not torch.cuda.is_available():
        sys.exit("--gpus-per-actor > 0 needs CUDA here (the bare baseline runs in this process)")
    if "gpu" in decodes and args.gpus_per_actor <= 0:
        sys.exit("--decode gpu needs --gpus-per-actor > 0")
    device = torch.device("cuda" if args.gpus_per_actor > 0 else "cpu")
    work = Path(tempfile.mkdtemp(prefix="lnstd-bench-job-"))
    try:
        payloads = write_photos(work / "in", args.images, seed=2, size=parse_size(args.size))
        paths = sorted((work / "in").glob("*.jpg"))
        torch.manual_seed(0)
        model = lnstd.load_model(args.model)
        ckpt = work / "model.safetensors"
        save_file(model.state_dict(), ckpt)
        model.to(device)
        busy = GpuBusy().start() if device.type == "cuda" else None
        results = []
        for decode in decodes:
            start, bare_s = bare(paths, model, args, decode, device)
            bare_busy = busy.fraction(start, start + bare_s) if busy else None
            if device.type == "cuda":
                torch.cuda.empty_cache()  # leave the GPU's memory to the job's actor
            out = work / f"out-{decode}"
            cmd = [sys.executable, "-m", "lnstd", "run", "--input", str(work / "in"), "--output", str(out),
                   "--model", args.model, "--checkpoint", str(ckpt), "--methods", args.methods,
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
                   "--cpus-per-actor", str(args.cpus_per_actor), "--gpus-per-actor", str(args.gpus_per_actor),
                   "--decode", decode, "--precision", args.precision, "--fit", args.fit,
                   "--no-progress", "--no-report"]  # fmt: skip
            if args.capture:
                cmd += ["--capture", args.capture]
            stop, actor_rss = threading.Event(), []
            rss_thread = threading.Thread(target=actor_peak_rss, args=(stop, actor_rss), daemon=True)
            rss_thread.start()
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                failure = f"exit {r.returncode}" if r.returncode != 0 else None
                stderr = r.stderr
            except subprocess.TimeoutExpired as exc:
                failure = f"timed out after {args.timeout:g} s"
                stderr = exc.stderr or ""
                stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
            job_wall = time.perf_counter() - t0
            stop.set()
            rss_thread.join()
            if failure:  # keep the other decoder's row: report this one as failed
                print(f"job with --decode {decode} failed ({failure}): {' '.join(cmd)}\n{stderr[-3000:]}",
                      file=sys.stderr)  # fmt: skip
                results.append((decode, bare_s, None, job_wall, bare_busy, None, failure))
                continue
            m = json.loads((out / layout.MANIFEST).read_text())
            tm = m["timings"]
            ready = tm["started"] + tm["startup_s"]
            job_busy = busy.fraction(ready, ready + tm["attribution_s"]) if busy else None
            m["actor_peak_rss_mb"] = max(actor_rss, default=float("nan"))
            results.append((decode, bare_s, tm["attribution_s"], job_wall, bare_busy, job_busy, m))
        if busy:
            busy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.images
    kb = statistics.mean(len(b) for b in payloads) / 1024
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{args.model}, methods {args.methods}, {n} photo-like JPEGs ({args.size}, mean {kb:.0f} KB), "
        f"batch {args.batch_size}, shards of {args.shard_size}, {where}, precision {args.precision}, "
        f"capture {args.capture or 'default'}, fit {args.fit}, {args.cpus_per_actor:g} CPUs (decode threads) "
        f"and {args.gpus_per_actor:g} GPUs per actor, torch {torch.__version__}"
    )
    gpu_cols = f" GPU busy, bare | GPU busy, job attribution ({busy.source}) |" if busy else ""
    print("\n| decode | bare img/s | job attribution phase img/s (x bare) | job whole command img/s (x bare) "
          f"|{gpu_cols} peak RSS MB: driver / actor / bare |")  # fmt: skip
    print("|---" * (5 + (2 if busy else 0)) + "|")
    for decode, bare_s, attr_s, job_wall, bare_busy, job_busy, m in results:

        def pct(f: float | None) -> str:
            return f"{f * 100:.0f}%" if f is not None else "-"

        gpu = f" {pct(bare_busy)} | {pct(job_busy)} |" if busy else ""
        if attr_s is None:  # the job failed: m says how
            print(f"| {decode} | {n / bare_s:.1f} | job {m} | - |{gpu} - |")
            continue
        print(
            f"| {decode} | {n / bare_s:.1f} | {n / attr_s:.1f} ({bare_s / attr_s:.2f}x) | "
            f"{n / job_wall:.1f} ({bare_s / job_wall:.2f}x) |{gpu} "
            f"{m['driver_peak_rss_mb']:.0f} / {m['actor_peak_rss_mb']:.0f} / {peak_rss_mb():.0f} |"
        )


if __name__ == "__main__":
    main()
