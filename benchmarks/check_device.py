"""On an accelerator: every method's heatmaps on the device equal the CPU ones (float32, no TF32),
and bf16 autocast stays close. Prints one line per model x method; exits non-zero on a mismatch."""

from __future__ import annotations

import argparse
import sys

import torch

import lnstd


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = lnstd.load_model(name)
        x = torch.randn(4, 3, 224, 224)
        cpu = lnstd.Explainer(model, lnstd.list_methods())(x)
        model.to(args.device)
        dev = lnstd.Explainer(model, lnstd.list_methods())(x.to(args.device))
        low = lnstd.Explainer(model, lnstd.list_methods(), precision="bf16")(x.to(args.device))
        for m in lnstd.list_methods():
            h_dev = dev.heatmaps[m]
            assert h_dev.device.type == torch.device(args.device).type
            err = (h_dev.cpu() - cpu.heatmaps[m]).abs().max().item()
            scale = cpu.heatmaps[m].abs().max().item()
            corr = torch.corrcoef(torch.stack([low.heatmaps[m].cpu().flatten(), cpu.heatmaps[m].flatten()]))
            good = err <= 1e-3 * max(scale, 1e-6) and bool(torch.equal(dev.targets.cpu(), cpu.targets))
            ok &= good
            print(
                f"{name} {m:9s} max|dev-cpu|={err:.2e} (max |heat| {scale:.2e}) "
                f"bf16 corr={corr[0, 1].item():.4f} {'OK' if good else 'MISMATCH'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
