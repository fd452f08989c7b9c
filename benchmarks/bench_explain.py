"""Cost of each attribution method relative to plain passes of the same model, measured in one run.

Prints, per model, capture mode and method: time over (a) an inference forward and (b) a forward +
backward to the input with parameters frozen (no weight gradients), images/s, and the speed-up of
one batched call over a loop of single images. Ratios, not absolute times: this machine is shared
and noisy. ``capture`` is how the attention and its gradient are read (``Explainer(capture=...)``):
``fused`` keeps the fused attention kernel and rebuilds them from q, k, v; ``unfused`` runs timm's
unfused attention path; both give the same maps, and their rows show what the fused path saves.
``default`` is what ``Explainer`` picks when no capture is given (per device; benchmarks/README.md,
"The capture default"); its rows are labelled with the capture it resolved to.

    python benchmarks/bench_explain.py                          # CPU, batch 4, fp32, both captures
    python benchmarks/bench_explain.py --device cuda --precision bf16 \
        --models vit_base_patch16_224,swin_tiny_patch4_window7_224        # batch 64 on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

import lnstd
from lnstd.arch import UnsupportedModelError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed_all(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: bool = True
) -> dict[str, float]:
    """Median seconds of each callable, measured round-robin after one warm-up call each (unless the
    caller has already called each once).

    Interleaving the candidates spreads the machine's drift over all of them alike, so the
    ratios between them hold even when absolute times wander.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
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
    methods = args.methods.split(",") if args.methods else lnstd.list_methods()
    captures = args.captures.split(",")
    loop_capture = args.loop_capture or captures[0]

    def forward_backward_loop():
        for s in singles:
            xi = s.detach().requires_grad_(True)
            with autocast():
                logits = model(xi).float()
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xi)

    fns: dict[str, Callable[[], object]] = {"forward": forward, "fwd_bwd": forward_backward}
    if not args.no_loop:
        fns["loop:fwd_bwd"] = forward_backward_loop
    keys = []  # (capture, method) timed
    for capture in captures:
        for method in [*methods, "all"]:
            try:
                ex = lnstd.Explainer(
                    model,
                    methods if method == "all" else [method],
                    precision=args.precision,
                    capture=None if capture == "default" else capture,
                )
            except UnsupportedModelError as exc:
                print(f"{name} {capture} {method}: skipped ({exc})")
                continue
            label = f"default ({ex.capture_for(device)})" if capture == "default" else capture
            keys.append((label, method))
            fns[f"{label}:{method}"] = lambda ex=ex: ex(x)
            if method != "all" and capture == loop_capture and not args.no_loop:
                fns[f"loop:{label}:{method}"] = lambda ex=ex: [ex(s) for s in singles]
    t = timed_all(fns, device, args.repeats)
    rows = []
    for capture, method in keys:
        key = f"{capture}:{method}"
        row = {
            "model": name,
            "capture": capture,
            "method": method,
            "vs_forward": t[key] / t["forward"],
            "vs_fwd_bwd": t[key] / t["fwd_bwd"],
            "images_s": args.batch / t[key],
        }
        if f"loop:{key}" in t:
            row["batched_speedup"] = (t[f"loop:{key}"] / len(singles)) / (t[key] / args.batch)
        rows.append(row)
    own = ""
    if "loop:fwd_bwd" in t:
        speedup = (t["loop:fwd_bwd"] / len(singles)) / (t["fwd_bwd"] / args.batch)
        own = f"; the bare model's own forward+backward is {speedup:.2f}x faster batched than looped"
    print(
        f"\n{name}: forward {args.batch / t['forward']:.1f} img/s, "
        f"forward+backward {args.batch / t['fwd_bwd']:.1f} img/s{own}\n"
    )
    # each model's table as soon as it is measured: a run cut short keeps the models it finished
    print(
        "| model | capture | method | time / forward (a) | time / fwd+bwd (b) | images/s | batched vs loop |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loop = f"{r['batched_speedup']:.2f}x" if "batched_speedup" in r else "-"
        print(
            f"| {r['model']} | {r['capture']} | {r['method']} | {r['vs_forward']:.2f} | "
            f"{r['vs_fwd_bwd']:.2f} | {r['images_s']:.1f} | {loop} |",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=None, help="default 4 on the CPU, 64 on a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="", help="comma list (default: every method, lnstd.list_methods())")
    p.add_argument(
        "--captures",
        default="fused,unfused",
        help="comma list of Explainer capture modes, and 'default' (the Explainer's choice for the device)",
    )
    p.add_argument(
        "--loop-images", type=int, default=None, help="single images in the loop (default 2 CPU, 16 GPU)"
    )
    p.add_argument("--loop-capture", default=None, help="capture whose loop is timed (default: the first)")
    p.add_argument("--no-loop", action="store_true", help="skip the loop-of-single-images timing")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (64 if cuda else 4)
    args.loop_images = args.loop_images or (16 if cuda else 2)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} threads) batch={args.batch} precision={args.precision} "
        f"repeats={args.repeats} torch={torch.__version__} timm={timm.__version__}"
    )
    rows = [r for name in args.models.split(",") for r in bench_model(name, args, device)]
    if len({r["capture"] for r in rows}) > 1:  # what the fused path saves, method by method
        by = {(r["model"], r["capture"], r["method"]): r["images_s"] for r in rows}
        caps = list(dict.fromkeys(r["capture"] for r in rows))
        print(f"\n| model | method | images/s {' | images/s '.join(caps)} | {caps[0]} vs {caps[1]} |")
        print("|---" * (3 + len(caps)) + "|")
        for model, method in dict.fromkeys((r["model"], r["method"]) for r in rows):
            speeds = [by.get((model, c, method)) for c in caps]
            cells = " | ".join(f"{v:.1f}" if v else "-" for v in speeds)
            ratio = f"{speeds[0] / speeds[1]:.2f}x" if speeds[0] and speeds[1] else "-"
            print(f"| {model} | {method} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
