"""Decode + preprocess throughput per core of each decoding variant, and what each changes in the
input and in the heatmaps against a full decode; ratios measured in one run.

Photo-like JPEGs (benchmarks/photos.py, about 500x375, quality 90) go through the one
preprocessing path, ``lnstd.data.preprocess.Preprocess``, for ViT-B/16's input (224, bicubic, its
normalisation and crop fraction) in both fits:

    full         PIL decode at full scale, exact bicubic resize (draft=False, reducing_gap=None)
    draft        JPEG DCT-domain downscale to no less than the input needs (the job's default)
    draft+rg2    draft, then PIL's reducing_gap=2.0 (a box pre-reduction before the bicubic)
    draft+rg3    draft, then reducing_gap=3.0
    tensor       torchvision.io.decode_jpeg on the CPU + Preprocess.pixels_tensor: the code of the
                 job's GPU path (lnstd.data.gpu.decode_on_gpu), run on the CPU
    gpu          (--device cuda) the same on the GPU: one batched nvjpeg call per --gpu-batch images,
                 crop/resize/normalise on the GPU, timed with CUDA synchronisation

    python benchmarks/bench_decode.py                                # 64 images, CPU
    python benchmarks/bench_decode.py --images 256 --device cuda     # adds the GPU decoder
    python benchmarks/bench_decode.py --sizes imagenet,1600x1200     # where draft pays off
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import timed_all
from photos import parse_size, photo_jpegs

import lnstd
from lnstd.data.decode import jpeg_header
from lnstd.data.gpu import decode_on_gpu
from lnstd.data.preprocess import Geometry, Preprocess

PIL_VARIANTS = {  # name: (draft, reducing_gap)
    "full": (False, None),
    "draft": (True, None),
    "draft+rg2": (True, 2.0),
    "draft+rg3": (True, 3.0),
}


@dataclass
class Rec:
    """The fields of the job's ``Loaded`` record that ``decode_on_gpu`` reads and fills."""

    raw: bytes | None
    geometry: Geometry
    tensor: torch.Tensor | None = None
    error: str | None = None
    detail: str | None = None


def preprocess_for(model_name: str, fit: str, **kwargs: Any) -> Preprocess:
    """``Preprocess.for_model`` from timm's pretrained config alone (no weights needed)."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name).to_dict()
    return Preprocess(
        tuple(cfg["input_size"][1:]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        fit=fit,
        crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0),
        **kwargs,
    )


def cpu_variants(model_name: str, fit: str) -> dict[str, Callable[[bytes], torch.Tensor]]:
    """Name -> bytes-to-normalised-input function, each the whole per-image CPU work of a decoder."""
    out: dict[str, Callable[[bytes], torch.Tensor]] = {}
    for name, (draft, gap) in PIL_VARIANTS.items():
        prep = preprocess_for(model_name, fit, draft=draft, reducing_gap=gap)
        out[name] = lambda data, prep=prep: prep.load(data)[0]
    prep = preprocess_for(model_name, fit)
    cpu = torch.device("cpu")

    def tensor(data: bytes) -> torch.Tensor:  # what the job's actor does per image with --decode gpu
        w, h, _ = jpeg_header(data)
        rec = Rec(data, prep.geometry(w, h))
        decode_on_gpu([rec], prep, cpu)
        return rec.tensor

    out["tensor"] = tensor
    return out


def gpu_variant(model_name: str, fit: str, payloads: list[bytes], device: torch.device, batch: int):
    """A callable decoding every payload on ``device`` in batches of ``batch`` (the headers, which
    the job reads on its CPU threads while the GPU works, are read once beforehand)."""
    prep = preprocess_for(model_name, fit)
    geoms = [prep.geometry(*jpeg_header(d)[:2]) for d in payloads]

    def run() -> list[torch.Tensor]:
        outs = []
        for k in range(0, len(payloads), batch):
            recs = [Rec(d, g) for d, g in zip(payloads[k : k + batch], geoms[k : k + batch], strict=True)]
            decode_on_gpu(recs, prep, device)
            outs += [r.tensor for r in recs]
        return outs

    return run


def pixels(x: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """Normalised input -> the resized picture in 0..255 (before normalisation), float64 on the CPU."""
    x = x.detach().cpu().double()
    return (x * prep.std.double() + prep.mean.double()) * 255.0


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of (B, ...) tensors."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="JPEGs per size")
    p.add_argument("--sizes", default="imagenet", help="comma list: imagenet (mix about 500x375) or WxH")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the N of the N-thread column")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fits", default="resize,center-crop")
    p.add_argument("--model", default="vit_base_patch16_224", help="whose input size and normalisation")
    p.add_argument("--heat-model", default="vit_small_patch16_224", help="random-weight model for the maps")
    p.add_argument("--heatmap-images", type=int, default=16, help="images whose maps are compared")
    p.add_argument("--methods", default="lnstd,gae")
    p.add_argument("--device", default="cpu", help="cuda: add the GPU decoder; also where maps are made")
    p.add_argument("--gpu-batch", type=int, default=64, help="images per nvjpeg call")
    args = p.parse_args()
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    fits = args.fits.split(",")
    methods = args.methods.split(",")
    # made by forked processes, so before CUDA starts here
    sets = {t: photo_jpegs(args.images, seed=1, size=parse_size(t)) for t in args.sizes.split(",")}
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{cores} cores, N={args.threads} threads, input of {args.model}, {args.images} images per size, "
        f"{args.repeats} repeats, torch={torch.__version__}"
    )

    torch.manual_seed(0)
    heat_model = lnstd.load_model(args.heat_model, pretrained=False, device=device)
    explainer = lnstd.Explainer(heat_model, methods)
    rows = []
    pool = ThreadPoolExecutor(args.threads)
    for size_text, payloads in sets.items():
        kb = statistics.mean(len(d) for d in payloads) / 1024
        fns: dict[str, Callable[[], list[torch.Tensor]]] = {}
        for fit in fits:
            for name, one in cpu_variants(args.model, fit).items():
                fns[f"{fit}|{name}|1"] = lambda one=one, pl=payloads: [one(d) for d in pl]
                fns[f"{fit}|{name}|N"] = lambda one=one, pl=payloads: list(pool.map(one, pl))
            if device.type == "cuda":
                fns[f"{fit}|gpu|1"] = gpu_variant(args.model, fit, payloads, device, args.gpu_batch)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per core: the pool's threads are the only parallelism
        # the outputs, for the accuracy columns; each call is also its candidate's warm-up
        outputs = {k: fn() for k, fn in fns.items() if k.endswith("|1")}
        for k, fn in fns.items():
            if k.endswith("|N"):
                fn()
        t = timed_all(fns, device, args.repeats, warmup=False)
        torch.set_num_threads(threads)
        for fit in fits:
            prep = preprocess_for(args.model, fit)
            ref = torch.stack([pixels(x, prep) for x in outputs[f"{fit}|full|1"]])
            nh = min(args.heatmap_images, len(payloads))
            maps = {}
            for key in [k for k in outputs if k.startswith(f"{fit}|")]:
                x = torch.stack([o.to(device) for o in outputs[key][:nh]])
                maps[key] = explainer(x).heatmaps
            for key, out in outputs.items():
                vfit, name, _ = key.split("|")
                if vfit != fit:
                    continue
                diff = (torch.stack([pixels(x, prep) for x in out]) - ref).abs()
                corr = {
                    m: pearson(maps[key][m], maps[f"{fit}|full|1"][m]).cpu() for m in methods
                }  # per image
                one = args.images / t[key]
                many = args.images / t[f"{fit}|{name}|N"] if f"{fit}|{name}|N" in t else None
                rows.append(
                    {
                        "size": f"{size_text} ({kb:.0f} KB)",
                        "fit": fit,
                        "variant": name,
                        "one": one,
                        "many": many,
                        "vs_full_1": one / (args.images / t[f"{fit}|full|1"]),
                        "vs_full_n": (many or one) / (args.images / t[f"{fit}|full|N"]),
                        "max_diff": diff.max().item(),
                        "mean_diff": diff.mean().item(),
                        "corr": {m: (c.mean().item(), c.min().item()) for m, c in corr.items()},
                    }
                )
    pool.shutdown()
    corr_cols = " | ".join(f"{m} corr mean / min" for m in methods)
    print(
        f"\n| images | fit | variant | img/s, 1 thread | img/s, {args.threads} threads | "
        f"speed-up vs full (1 / {args.threads} threads) | pixel diff max / mean | {corr_cols} |"
    )
    print("|---" * (7 + len(methods)) + "|")
    for r in rows:
        many = f"{r['many']:.1f}" if r["many"] is not None else "-"
        corr = " | ".join(
            "ref" if r["variant"] == "full" else f"{r['corr'][m][0]:.4f} / {r['corr'][m][1]:.4f}"
            for m in methods
        )
        label = "gpu (one thread drives the GPU)" if r["variant"] == "gpu" else r["variant"]
        print(
            f"| {r['size']} | {r['fit']} | {label} | {r['one']:.1f} | {many} | "
            f"{r['vs_full_1']:.2f}x / {r['vs_full_n']:.2f}x | {r['max_diff']:.1f} / {r['mean_diff']:.3f} | "
            f"{corr} |"
        )


if __name__ == "__main__":
    main()
