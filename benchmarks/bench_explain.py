"""Cost of each attribution method relative to plain passes of the same model, measured in one run.

Prints, per model and method: time over (a) an inference forward and (b) a forward + backward to
the input with parameters frozen (no weight gradients), images/s, and the speed-up of one batched
call over a loop of single images. Ratios, not absolute times: this machine is shared and noisy.

    python benchmarks/bench_explain.py                          # CPU, batch 16, fp32
    python benchmarks/bench_explain.py --device cuda --batch 64 --precision bf16 \
        --models vit_base_patch16_224,swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lnstd

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed_all(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, measured round-robin after one warm-up call each.

    Interleaving the candidates spreads the machine's drift over all of them alike, so the
    ratios between them hold even when absolute times wander.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = lnstd.load_model(name, pretrained=False, device=device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *model.pretrained_cfg["input_size"][1:], device=device)
    singles = [x[i : i + 1] for i in range(min(args.loop_images, args.batch))]
    dtype = DTYPES[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def forward():
        with torch.no_grad(), autocast():
            model(x)

    def forward_backward():
        xi = x.detach().requires_grad_(True)
        with autocast():
            logits = model(xi).float()
        torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xi)

    for p in model.parameters():
        p.requires_grad_(False)  # baseline (b): gradients to the input only
    methods = lnstd.list_methods()

    def forward_backward_loop():
        for s in singles:
            xi = s.detach().requires_grad_(True)
            with autocast():
                logits = model(xi).float()
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xi)

    fns: dict[str, Callable[[], object]] = {"forward": forward, "fwd_bwd": forward_backward}
    if not args.no_loop:
        fns["loop:fwd_bwd"] = forward_backward_loop
    for method in [*methods, "all"]:
        ex = lnstd.Explainer(model, methods if method == "all" else [method], precision=args.precision)
        fns[method] = lambda ex=ex: ex(x)
        if method != "all" and not args.no_loop:
            fns[f"loop:{method}"] = lambda ex=ex: [ex(s) for s in singles]
    t = timed_all(fns, device, args.repeats)
    rows = []
    for method in [*methods, "all"]:
        row = {
            "model": name,
            "method": method,
            "vs_forward": t[method] / t["forward"],
            "vs_fwd_bwd": t[method] / t["fwd_bwd"],
            "images_s": args.batch / t[method],
        }
        if f"loop:{method}" in t:
            row["batched_speedup"] = (t[f"loop:{method}"] / len(singles)) / (t[method] / args.batch)
        rows.append(row)
    own = ""
    if "loop:fwd_bwd" in t:
        speedup = (t["loop:fwd_bwd"] / len(singles)) / (t["fwd_bwd"] / args.batch)
        own = f"; the bare model's own forward+backward is {speedup:.2f}x faster batched than looped"
    print(
        f"# {name}: forward {args.batch / t['forward']:.1f} img/s, "
        f"forward+backward {args.batch / t['fwd_bwd']:.1f} img/s{own}",
        flush=True,
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-images", type=int, default=16, help="single images timed in the loop")
    p.add_argument("--no-loop", action="store_true", help="skip the loop-of-single-images timing")
    args = p.parse_args()
    device = torch.device(args.device)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} threads) batch={args.batch} precision={args.precision} "
        f"torch={torch.__version__}"
    )
    rows = [r for name in args.models.split(",") for r in bench_model(name, args, device)]
    print("\n| model | method | time / forward (a) | time / fwd+bwd (b) | images/s | batched vs loop |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loop = f"{r['batched_speedup']:.2f}x" if "batched_speedup" in r else "-"
        print(
            f"| {r['model']} | {r['method']} | {r['vs_forward']:.2f} | {r['vs_fwd_bwd']:.2f} | "
            f"{r['images_s']:.1f} | {loop} |"
        )


if __name__ == "__main__":
    main()
