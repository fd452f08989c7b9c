"""Cost of ``lnstd.faithfulness`` against per-image references, measured side by side in one run.

Prints two Markdown tables:

1. images/s of the batched function (one forward per chunk of step images of every image, ROAD's
   imputation as one batched conjugate-gradient solve) and of a per-image loop that does what the
   reference implementations do (pytorch-grad-cam's ROAD, Quantus' Pixel-Flipping): one image at a
   time, one forward per step image, ROAD's imputation a direct sparse solve (tests/
   reference_faithfulness.py: SciPy, float64, system built pixel by pixel); with
   the largest difference of their figures. pytorch-grad-cam's own ``ROADMostRelevantFirst`` /
   ``ROADLeastRelevantFirst`` and Quantus' ``PixelFlipping`` (as deletion) are added when they can be
   imported (both are dev dependencies), and the model's forwards alone: no implementation of these
   tests can be faster than the forwards of its step images.
2. The imputation alone: ``impute(solver="cg")`` (batched conjugate gradients on the model's device)
   against ``impute(solver="direct")`` (SciPy's sparse LU per image, CPU), largest difference.

    python benchmarks/bench_faithfulness.py                          # CPU: 4 images, 112 px
    python benchmarks/bench_faithfulness.py --device cuda --images 32 --size 224
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lnstd
from lnstd.metrics.faithfulness import ROAD_PERCENTILES, _road_kept, faithfulness, forwards_per_image, impute
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


def quantus_deletion(model, x: torch.Tensor, heat: torch.Tensor, t: torch.Tensor, steps: int):
    """Quantus' ``PixelFlipping`` configured as deletion with ``steps`` (as tests/test_faithfulness.py):
    the map upsampled to the image, baseline 0, softmax. Quantus counts its step in values of the map
    broadcast over the channels and its step must divide H*W, so it takes ``per`` forwards per point of
    ours (every ``per``-th of its points is ours). Returns (its curves at our points, per), or None when
    Quantus cannot be imported."""
    try:
        import quantus
    except ImportError:
        return None
    h, w = x.shape[-2:]
    pixels = h * w // steps
    feats = math.gcd(3 * pixels, h * w)
    per = 3 * pixels // feats
    cams = F.interpolate(heat[:, None], size=(h, w), mode="bilinear", align_corners=False).numpy()
    metric = quantus.PixelFlipping(features_in_step=feats, perturb_baseline=0.0, disable_warnings=True,
                                   display_progressbar=False)  # fmt: skip
    curves = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=cams, device="cpu",
                    softmax=True, channel_first=True, batch_size=len(x))  # fmt: skip
    return np.asarray(curves)[:, per - 1 :: per], per


def references(args, model, x, heat, t, fast: dict, t_fast: float, t_road: float) -> None:
    """The rows of the per-image references, on the CPU: the loop, pytorch-grad-cam's ROAD, Quantus'
    deletion (each against the batched function's time on the device)."""
    n = args.images
    t0 = time.perf_counter()
    slow = loop(model, x, heat, t, args.steps)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = gradcam_road(model, x, heat, t)
    t_gc = time.perf_counter() - t0
    diff = max(abs(float(fast[k][i]) - slow[k][i]) for k in slow for i in range(n))
    print(f"| per-image loop, direct sparse solve | {n / t_loop:.3f} | {t_loop / t_fast:.1f}x | {diff:.1e} |")
    if theirs is not None:
        diff = max(abs(float(fast[k][i]) - theirs[k][i]) for k in theirs for i in range(n))
        print(f"| lnstd.faithfulness, road only | {n / t_road:.3f} | - | - |")
        print(f"| pytorch-grad-cam ROAD | {n / t_gc:.3f} | {t_gc / t_road:.1f}x (road only) | {diff:.1e} |")
    steps_q = args.quantus_steps
    t0 = time.perf_counter()
    ours_q = faithfulness(model, x, heat, t, metrics=["deletion"], steps=steps_q, curves=True)
    t_ours_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantus_q = quantus_deletion(model, x, heat, t, steps_q)
    t_quantus = time.perf_counter() - t0
    if quantus_q is not None:
        curves, per = quantus_q
        diff = float(np.abs(ours_q["deletion_curve"][:, 1:].numpy() - curves).max())
        print(f"| lnstd.faithfulness, deletion only, {steps_q} steps (CPU) | {n / t_ours_q:.3f} | - | - |")
        print(f"| Quantus PixelFlipping as that deletion ({per} forwards per point) | {n / t_quantus:.3f} | "
              f"{t_quantus / t_ours_q:.1f}x (deletion only) | {diff:.1e} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=112, help="image size (timm img_size)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--quantus-steps", type=int, default=8, help="deletion's steps against Quantus (divide H*W)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-references", action="store_true", help="only the batched function and the floor")
    p.add_argument("--impute-images", type=int, default=None, help="images in the imputation table (all)")
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
    n = args.images
    print(f"\n{args.model} at {args.size} px, {n} images, {args.device}, {args.threads} thread(s), "
          f"steps {args.steps}, ROAD noise 0\n")  # fmt: skip
    print("| candidate | images/s | batched's speed-up | max difference of figures |")
    print("|---|---|---|---|")
    print(f"| lnstd.faithfulness (deletion, insertion, road; batched) | {n / t_fast:.3f} | 1 | - |")
    if not args.skip_references:
        references(args, model.cpu(), x.cpu(), heat.cpu(), t.cpu(), fast, t_fast, t_road)
        model.to(dev)
    images = n * forwards_per_image(("deletion", "insertion", "road"), args.steps)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, images, 64):
            model(torch.randn(min(64, images - k), 3, args.size, args.size, device=dev))
    sync()
    t_floor = time.perf_counter() - t0
    print(f"| the model's forwards alone ({images} step images, as the batched call's) | {n / t_floor:.3f} "
          f"| {t_floor / t_fast:.2f}x (the floor) | - |")  # fmt: skip

    # the imputation alone: every ROAD mask of every image
    x, heat = x[: args.impute_images], heat[: args.impute_images]
    n = len(x)
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
