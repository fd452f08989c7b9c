"""Cost of ``lnstd.faithfulness`` against per-image references, measured side by side in one run.

Prints two Markdown tables:

1. images/s of the batched function (one forward per chunk of step images of every image, ROAD's
   imputation as one batched conjugate-gradient solve) and of a per-image loop that does what the
   reference implementations do (pytorch-grad-cam's ROAD, Quantus' Pixel-Flipping): one image at a
   time, one forward per step image, ROAD's imputation a direct sparse solve (tests/
   reference_faithfulness.py: SciPy, float64, system built pixel by pixel); with
   the largest difference of their figures. pytorch-grad-cam's own ``ROADMostRelevantFirst`` /
   ``ROADLeastRelevantFirst`` is added when it can be imported (it needs OpenCV; not a dependency).
2. The imputation alone: ``impute(solver="cg")`` (batched conjugate gradients on the model's device)
   against ``impute(solver="direct")`` (SciPy's sparse LU per image, CPU), largest difference.

    python benchmarks/bench_faithfulness.py                          # CPU: 4 images, 112 px
    python benchmarks/bench_faithfulness.py --device cuda --images 32 --size 224
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lnstd
from lnstd.metrics.faithfulness import ROAD_PERCENTILES, _road_kept, faithfulness, impute
from lnstd.metrics.perturbation import pixel_ranks
from tests import reference_faithfulness as ref


def loop(model, x: torch.Tensor, heat: torch.Tensor, t: torch.Tensor, steps: int) -> dict[str, list]:
    """Per image: one forward per step image, ROAD's imputation a direct sparse solve."""
    b, _, h, w = x.shape
    up = F.interpolate(heat[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    out: dict[str, list] = {k: [] for k in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")}
    for i in range(b):
        img, cam, target = x[i].double().numpy(), up[i].double().numpy(), int(t[i])
        dele, ins = ref.deletion_insertion(model, img, cam, target, steps, 0.0)
        out["deletion_auc"].append(ref.trapezoid(dele))
        out["insertion_auc"].append(ref.trapezoid(ins))
        rank = rankdata(-cam.ravel(), method="average") - 1  # ties at their average rank, as lnstd
        morf, lerf = [], []
        for q in ROAD_PERCENTILES:
            kept = _road_kept(q, h * w)
            for curve, keep in ((morf, rank > h * w - 1 - kept), (lerf, rank < kept)):
                filled = ref.road_impute(img, keep.reshape(h, w))
                with torch.no_grad():
                    p = model(torch.tensor(filled, dtype=torch.float32)[None]).softmax(1)[0, target]
                curve.append(float(p))
        out["road_morf"].append(np.mean(morf))
        out["road_lerf"].append(np.mean(lerf))
    return out


def gradcam_road(model, x: torch.Tensor, heat: torch.Tensor, t: torch.Tensor) -> dict[str, list] | None:
    """pytorch-grad-cam's ROAD (noise 0), if importable."""
    try:
        from pytorch_grad_cam.metrics.perturbation_confidence import (
            PerturbationConfidenceMetric,
            RemoveLeastRelevantFirst,
            RemoveMostRelevantFirst,
        )
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    except ImportError:
        return None
    h, w = x.shape[-2:]
    cams = F.interpolate(heat[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
    out = {}
    for name, remove in (("road_morf", RemoveMostRelevantFirst), ("road_lerf", RemoveLeastRelevantFirst)):
        per = [PerturbationConfidenceMetric(remove(q, NoisyLinearImputer(noise=0.0)))(
            x, cams, targets, model, return_diff=False) for q in ROAD_PERCENTILES]  # fmt: skip
        out[name] = list(np.mean(per, axis=0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=112, help="image size (timm img_size)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = lnstd.load_model(args.model, img_size=args.size, num_classes=10, device=dev)
    x = torch.randn(args.images, 3, args.size, args.size, device=dev)
    out = lnstd.Explainer(model, ["gae"])(x)
    heat, t = out.heatmaps["gae"], out.targets
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    sync()
    t0 = time.perf_counter()
    fast = faithfulness(model, x, heat, t, steps=args.steps, road_noise=0.0, chunk=64)
    sync()
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    faithfulness(model, x, heat, t, metrics=["road"], road_noise=0.0, chunk=64)
    sync()
    t_road = time.perf_counter() - t0
    cpu_model = model.cpu() if dev.type != "cpu" else model
    t0 = time.perf_counter()
    slow = loop(cpu_model, x.cpu(), heat.cpu(), t.cpu(), args.steps)
    t_loop = time.perf_counter() - t0
    model.to(dev)
    t0 = time.perf_counter()
    theirs = gradcam_road(cpu_model, x.cpu(), heat.cpu(), t.cpu())
    t_gc = time.perf_counter() - t0
    model.to(dev)
    n = args.images
    print(f"\n{args.model} at {args.size} px, {n} images, {args.device}, {args.threads} thread(s), "
          f"steps {args.steps}, ROAD noise 0\n")  # fmt: skip
    print("| candidate | images/s | batched's speed-up | max difference of figures |")
    print("|---|---|---|---|")
    print(f"| lnstd.faithfulness (deletion, insertion, road; batched) | {n / t_fast:.3f} | 1 | - |")
    diff = max(abs(float(fast[k][i]) - slow[k][i]) for k in slow for i in range(n))
    print(f"| per-image loop, direct sparse solve | {n / t_loop:.3f} | {t_loop / t_fast:.1f}x | {diff:.1e} |")
    if theirs is not None:
        diff = max(abs(float(fast[k][i]) - theirs[k][i]) for k in theirs for i in range(n))
        print(f"| lnstd.faithfulness, road only | {n / t_road:.3f} | - | - |")
        print(f"| pytorch-grad-cam ROAD | {n / t_gc:.3f} | {t_gc / t_road:.1f}x (road only) | {diff:.1e} |")

    # the imputation alone: every ROAD mask of every image
    ranks = pixel_ranks(heat, (args.size, args.size))
    pixels = args.size**2
    known = torch.cat([ranks > pixels - 1 - _road_kept(q, pixels) for q in ROAD_PERCENTILES]
                      + [ranks < _road_kept(q, pixels) for q in ROAD_PERCENTILES])  # fmt: skip
    known = known.view(-1, args.size, args.size)
    imgs = x.repeat(2 * len(ROAD_PERCENTILES), 1, 1, 1)
    secs = {}
    for solver in ("cg", "direct"):
        sync()
        t0 = time.perf_counter()
        got = impute(imgs, known, solver=solver)
        sync()
        secs[solver] = time.perf_counter() - t0
        if solver == "cg":
            cg = got
    worst = float((cg.double() - got.double()).abs().max())
    m = len(imgs)
    k = 2 * len(ROAD_PERCENTILES)
    print(f"\nROAD imputation alone: {m} systems ({n} images x {k} masks), 3 channels\n")
    print("| solver | systems/s | CG's speed-up | max difference |")
    print("|---|---|---|---|")
    print(f"| batched CG (float64, torch, {args.device}) | {m / secs['cg']:.2f} | 1 | - |")
    ratio = secs["direct"] / secs["cg"]
    print(f"| direct sparse LU (SciPy, per image) | {m / secs['direct']:.2f} | {ratio:.2f}x | {worst:.1e} |")


if __name__ == "__main__":
    main()
