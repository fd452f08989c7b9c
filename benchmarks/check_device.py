"""On an accelerator: every method's heatmaps on the device equal the CPU ones (float32, no TF32),
in both capture modes, the two capture modes agree with each other, and bf16 autocast stays close.
Prints one Markdown row per model x capture x method; exits non-zero on a mismatch (a device or
capture difference over rtol x the map's largest magnitude + atol, or other targets). The bf16
correlation is reported, not judged.

    python benchmarks/check_device.py                       # cuda against the CPU
    python benchmarks/check_device.py --device cpu          # the wiring alone (CPU against itself)
"""

from __future__ import annotations

import argparse
import sys

import torch

import lnstd
from lnstd.arch import UnsupportedModelError
from lnstd.data.preprocess import input_size

CAPTURES = ("fused", "unfused")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    p.add_argument("--methods", default="", help="comma list (default: every method)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rtol", type=float, default=1e-3, help="of the map's largest magnitude")
    p.add_argument("--atol", type=float, default=1e-6, help="added to rtol x the largest magnitude")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    methods = args.methods.split(",") if args.methods else lnstd.list_methods()
    device = torch.device(args.device)
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name_of}) torch={torch.__version__} methods={','.join(methods)}\n")
    print("| model | capture | method | max abs(device - cpu) | max abs(heat) | vs other capture (cpu) "
          "| bf16 corr | same targets | verdict |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = lnstd.load_model(name)
        x = torch.randn(args.batch, 3, *input_size(model))
        cpu, dev, low = {}, {}, {}
        for capture in CAPTURES:
            try:
                cpu[capture] = lnstd.Explainer(model.cpu(), methods, capture=capture)(x)
            except UnsupportedModelError as exc:
                print(f"| {name} | {capture} | - | skipped: {exc} | | | | | |")
        model.to(device)
        xd = x.to(device)
        for capture in cpu:
            dev[capture] = lnstd.Explainer(model, methods, capture=capture)(xd)
            low[capture] = lnstd.Explainer(model, methods, capture=capture, precision="bf16")(xd)
        for capture in cpu:
            other = next((c for c in cpu if c != capture), None)
            for m in methods:
                ref = cpu[capture].heatmaps[m]
                h_dev = dev[capture].heatmaps[m]
                assert h_dev.device.type == device.type
                err = (h_dev.cpu() - ref).abs().max().item()
                scale = ref.abs().max().item()
                tol = args.rtol * scale + args.atol
                cross = (cpu[other].heatmaps[m] - ref).abs().max().item() if other else float("nan")
                corr = torch.corrcoef(torch.stack([low[capture].heatmaps[m].cpu().flatten(), ref.flatten()]))
                same = bool(torch.equal(dev[capture].targets.cpu(), cpu[capture].targets))
                good = err <= tol and same and not (cross > tol)
                ok &= good
                print(
                    f"| {name} | {capture} | {m} | {err:.2e} | {scale:.2e} | {cross:.2e} | "
                    f"{corr[0, 1].item():.4f} | {same} | {'OK' if good else 'MISMATCH'} |",
                    flush=True,
                )
    print(f"\n{'all OK' if ok else 'MISMATCH found'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
