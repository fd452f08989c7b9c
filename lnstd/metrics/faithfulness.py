"""How faithful a heatmap is to the model, per image, batched on the model's device.

``deletion`` / ``insertion`` (Petsiuk et al. 2018): the target's probability as the most relevant
pixels are removed (lower area is better) or shown on the baseline (higher is better). ``road``
(Rong et al., ICML 2022): the removed pixels are filled by ROAD's noisy linear imputation rather than
a constant, at the paper's percentiles, most relevant first (MoRF, lower is better) and least
relevant first (LeRF, higher is better). The imputation solves the reference's sparse system
(pytorch-grad-cam's ``NoisyLinearImputer``): for a whole batch at once by conjugate gradients on an
accelerator, by a direct sparse solve per image on the CPU. docs/methods.md, "Faithfulness", has the
definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .perturbation import auc, perturbed, pixel_ranks, target_scores
from .registry import FAITHFULNESS, FAITHFULNESS_COLUMNS

__all__ = [
    "FAITHFULNESS",
    "FAITHFULNESS_COLUMNS",
    "ROAD_PERCENTILES",
    "SOLVERS",
    "faithfulness",
    "forwards_per_image",
    "impute",
]

# ROAD's percentiles (the paper's and pytorch-grad-cam's ROAD*Average): at q, MoRF keeps the
# ceil(q/100 * (n-1)) least relevant of the n pixels and imputes the rest; LeRF keeps as many of
# the most relevant (np.percentile's threshold, ``<``, on distinct values).
ROAD_PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01  # the reference imputer's noise (absolute, in the model's input space)


def forwards_per_image(metrics: Sequence[str], steps: int = 10) -> int:
    """Model forwards per image and method that :func:`faithfulness` runs."""
    both = {"deletion", "insertion"} & set(metrics)
    n = {0: 0, 1: steps + 1, 2: 2 * steps}[len(both)]
    return n + (2 * len(ROAD_PERCENTILES) if "road" in metrics else 0)


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """The stencil's weighted sum of the 8 neighbours of each pixel of (N, 1, H, W), zero outside:
    ([1, 2, 1] x [1, 2, 1] - 4 * centre) / 12, separable."""
    p = F.pad(x, (1, 1, 1, 1))
    v = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    return (v[..., :-2] + 2 * v[..., 1:-1] + v[..., 2:] - 4 * x) / 12


SOLVERS = ("auto", "cg", "direct")
# The reference's neighbour weights: 1/6 for the 4 edge neighbours, 1/12 for the 4 diagonal ones.
_OFFSETS = (((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12), ((0, -1), 1 / 6),
            ((0, 1), 1 / 6), ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12))  # fmt: skip


@torch.no_grad()
def impute(
    images: torch.Tensor,
    known: torch.Tensor,
    noise: float = 0.0,
    solver: str = "auto",
    tol: float = 1e-8,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ROAD's noisy linear imputation of every image of (B, C, H, W).

    Each unknown pixel (``known`` (B, H, W) False) becomes the weighted mean of its in-image
    neighbours (the reference's stencil), known ones fixed: per image and channel the sparse
    symmetric positive-definite system ``d_i x_i - sum_j w_ij x_j = sum_known w_ij v_j``.
    ``solver``: ``"cg"``, Jacobi-preconditioned conjugate gradients in float64 for all images and
    channels at once on their device, until every residual is below ``tol`` times its right-hand
    side; ``"direct"``, SciPy's sparse LU, one image at a time on the CPU (faster there:
    benchmarks/README.md); ``"auto"``, direct on the CPU, CG elsewhere. An image with no known
    pixel becomes 0. Then ``noise`` times standard normal noise is added to the imputed pixels.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "direct" or (solver == "auto" and images.device.type == "cpu"):
        out = _direct(images, known)
    else:
        out = _cg(images, known, tol, max_iter)
    if noise:
        eps = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + noise * eps * (~known.bool())[:, None].to(out.dtype)
    return out


def _cg(images: torch.Tensor, known: torch.Tensor, tol: float, max_iter: int | None) -> torch.Tensor:
    """:func:`impute` by batched conjugate gradients on the stencil (no matrix is built)."""
    b, c, h, w = images.shape
    x = images.to(torch.float64).reshape(b * c, 1, h, w)
    unknown = (~known.bool()).to(torch.float64)[:, None].expand(b, c, h, w).reshape(b * c, 1, h, w)
    d = _neighbours(torch.ones(1, 1, h, w, dtype=torch.float64, device=images.device))

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (d * v - _neighbours(v)) * unknown

    rhs = _neighbours(x * (1 - unknown)) * unknown
    sol = _pull_push(x, 1 - unknown) * unknown  # a smooth first guess: CG is slowest on smooth error
    r = rhs - apply(sol)
    z = r / d
    p = z.clone()
    rz = (r * z).sum(dim=(1, 2, 3), keepdim=True)
    bound = (tol * rhs.flatten(1).norm(dim=1)) ** 2
    for it in range(max_iter or 20 * (h + w)):
        ap = apply(p)
        pap = (p * ap).sum(dim=(1, 2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp(min=1e-300), 0.0)
        sol += alpha * p
        r -= alpha * ap
        if it % 8 == 7 and bool(((r * r).flatten(1).sum(1) <= bound).all()):
            break
        z = r / d
        rz_new = (r * z).sum(dim=(1, 2, 3), keepdim=True)
        p = z + torch.where(rz > 0, rz_new / rz.clamp(min=1e-300), 0.0) * p
        rz = rz_new
    return torch.where(unknown > 0, sol, x).reshape(b, c, h, w).to(images.dtype)


def _direct(images: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """:func:`impute` by SciPy's sparse direct solve, per image (all channels share one factorisation)."""
    import numpy as np
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    b, c, h, w = images.shape
    imgs = images.detach().to("cpu", torch.float64).numpy().reshape(b, c, h * w)
    kns = known.bool().cpu().numpy().reshape(b, h * w)
    out = imgs.copy()
    for i in range(b):
        kn, flat = kns[i], imgs[i]
        idx = np.flatnonzero(~kn)
        if not len(idx) or not kn.any():
            out[i][:, idx] = 0.0
            continue
        var = np.full(h * w, -1)
        var[idx] = np.arange(len(idx))
        y, x = np.divmod(idx, w)
        diag, rhs = np.zeros(len(idx)), np.zeros((len(idx), c))
        rows, cols, vals = [np.arange(len(idx))], [np.arange(len(idx))], []
        for (dy, dx), wt in _OFFSETS:
            yy, xx = y + dy, x + dx
            inside = np.flatnonzero((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))
            q = yy[inside] * w + xx[inside]
            diag[inside] += wt
            fixed = kn[q]
            rhs[inside[fixed]] += wt * flat[:, q[fixed]].T  # each (row, offset) pair once
            rows.append(inside[~fixed]), cols.append(var[q[~fixed]])
            vals.append(np.full(int((~fixed).sum()), -wt))
        a = sp.csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(idx), len(idx)))  # fmt: skip
        out[i][:, idx] = np.asarray(spl.spsolve(a, rhs)).reshape(len(idx), c).T
    return torch.from_numpy(out.reshape(b, c, h, w)).to(images.device, images.dtype)


def _pull_push(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """A smooth fill of the unknown pixels of (N, 1, H, W) ``x`` (``known`` 1/0): the known mean of
    each 2 x 2 block, recursively, upsampled back into the holes. 0 where nothing is known."""
    h, w = x.shape[-2:]
    if h <= 2 and w <= 2:
        total = known.sum(dim=(2, 3), keepdim=True)
        return (x * known).sum(dim=(2, 3), keepdim=True) / total.clamp(min=1) * torch.ones_like(x)
    mass = F.avg_pool2d(x * known, 2, ceil_mode=True)
    count = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = _pull_push(mass / count.clamp(min=1e-12), (count > 0).to(x.dtype))
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.where(known > 0, x, up)


def _baseline(images: torch.Tensor, baseline: float | str | torch.Tensor) -> torch.Tensor:
    """The deletion/insertion baseline: a value (0 = the dataset mean in normalised space), an image
    batch, or ``"blur"`` (Petsiuk et al.'s Gaussian blur: 11 x 11, sigma 5)."""
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(f"baseline must be a number, a tensor or 'blur', got {baseline!r}")
        g = torch.exp(-((torch.arange(11, device=images.device, dtype=images.dtype) - 5) ** 2) / 50)
        g = g / g.sum()
        c = images.shape[1]
        pad = F.pad(images, (5, 5, 5, 5), mode="reflect")
        out = F.conv2d(pad, g.view(1, 1, 1, 11).expand(c, 1, 1, 11), groups=c)
        return F.conv2d(out, g.view(1, 1, 11, 1).expand(c, 1, 11, 1), groups=c)
    return torch.as_tensor(baseline, dtype=images.dtype, device=images.device)


@torch.no_grad()
def faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    heat: torch.Tensor,
    targets: torch.Tensor,
    metrics: Sequence[str] = FAITHFULNESS,
    steps: int = 10,
    baseline: float | str | torch.Tensor = 0.0,
    road_noise: float = ROAD_NOISE,
    road_percentiles: Sequence[int] = ROAD_PERCENTILES,
    solver: str = "auto",
    chunk: int = 64,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    curves: bool = False,
    hits: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-image faithfulness of (B, h, w) maps of (B, C, H, W) ``images`` for ``targets`` (B,).

    ``deletion_auc`` / ``insertion_auc``: trapezoid area (x from 0 to 1) of the target's softmax
    probability as the top ``j/steps`` of pixels (ranked by the map upsampled to the image, ties
    at their average rank) are replaced by / shown on ``baseline``. ``road_morf`` / ``road_lerf``:
    the probability after imputing the most / least relevant pixels (:func:`impute`, noise
    ``road_noise``: one field per step from ``seed``, the same for every image, so an image's
    figures do not depend on its batch; ``solver`` as there), averaged over ``road_percentiles``;
    ``road_gap`` = ``road_lerf - road_morf``. Step images of every image share forwards, ``chunk``
    images at a time, under autocast to ``dtype`` when given. ``curves`` adds the curves
    (``deletion_curve``, ``insertion_curve``: (B, steps + 1); ``road_morf_curve``,
    ``road_lerf_curve``: (B, len(road_percentiles))); ``hits``, for deletion and insertion, whether
    the target is still the argmax at each step (``deletion_hits``, ``insertion_hits``: (B, steps + 1)
    float32, 1 or 0), the accuracy curves of the same step images (``lnstd eval``'s ``positive``).

    Returns:
        dict of (B,) float32 tensors on the images' device, the figures of ``metrics``.
    """
    unknown = set(metrics) - set(FAITHFULNESS)
    if unknown or steps < 1:
        raise ValueError(f"metrics must be among {FAITHFULNESS} and steps >= 1, got {metrics}, {steps}")
    b, _, h, w = images.shape
    n = h * w
    ranks = pixel_ranks(heat.to(images.device), (h, w))
    base = _baseline(images, baseline)
    plan, want = _plan(metrics, steps, n, road_percentiles)

    def make(r: range) -> torch.Tensor:
        road = [plan[s] for s in r if plan[s][0].startswith("road")]
        filled = iter(_road_images(images, ranks, road, road_noise, seed, solver).split(b) if road else [])
        return torch.cat(
            [
                next(filled) if plan[s][0].startswith("road") else perturbed(images, ranks, plan[s], base)
                for s in r
            ]
        )

    probs, argmax_hits = target_scores(model, len(plan), make, targets, chunk, dtype)
    out: dict[str, torch.Tensor] = {}
    for name, idx in want.items():
        if not idx:
            continue
        curve = probs[idx].T.contiguous()
        if name in ("deletion", "insertion"):
            out[f"{name}_auc"] = auc(curve, [j / steps for j in range(steps + 1)])
        else:
            out[name] = curve.mean(dim=1)
        if curves:
            out[f"{name}_curve"] = curve
        if hits and name in ("deletion", "insertion"):
            out[f"{name}_hits"] = argmax_hits[idx].T.contiguous()
    if "road" in metrics:
        out["road_gap"] = out["road_lerf"] - out["road_morf"]
    return out


def _plan(
    metrics: Sequence[str], steps: int, n: int, road_percentiles: Sequence[int]
) -> tuple[list[tuple[str, int]], dict[str, list[int]]]:
    """The distinct step images of ``metrics`` (kind, k) and, per curve, its points' places among
    them. Deletion of none and insertion of all are the image itself, deletion of all and insertion
    of none the baseline: each is forwarded once."""
    plan: list[tuple[str, int]] = []

    def slot(step: tuple[str, int]) -> int:
        key = ("keep_top", n) if step == ("remove_top", 0) else step
        key = ("remove_top", n) if key == ("keep_top", 0) else key
        if key not in plan:
            plan.append(key)
        return plan.index(key)

    ks = [round(j / steps * n) for j in range(steps + 1)]
    want = {
        "deletion": [slot(("remove_top", k)) for k in ks] if "deletion" in metrics else [],
        "insertion": [slot(("keep_top", k)) for k in ks] if "insertion" in metrics else [],
    }
    if "road" in metrics:
        kept = [_road_kept(q, n) for q in road_percentiles]
        for kind in ("road_morf", "road_lerf"):
            want[kind] = [slot((kind, k)) for k in kept]
    return plan, want


def _road_kept(q: int, n: int) -> int:
    """Pixels the reference keeps at percentile ``q`` of n distinct values: those below
    ``np.percentile(values, q)`` (linear), i.e. ceil(q/100 * (n-1))."""
    import math

    return math.ceil(q / 100 * (n - 1))


def _road_images(
    images: torch.Tensor,
    ranks: torch.Tensor,
    steps: list[tuple[str, int]],
    noise: float,
    seed: int,
    solver: str,
) -> torch.Tensor:
    """The imputed images of several ROAD steps of every image, in one solve: (S*B, C, H, W)."""
    n = ranks.shape[1]
    b, c, h, w = images.shape
    known = torch.cat([ranks > n - 1 - k if kind == "road_morf" else ranks < k for kind, k in steps])
    out = impute(images.repeat(len(steps), 1, 1, 1), known.view(-1, h, w), solver=solver)
    if not noise:
        return out
    fields = []
    for kind, k in steps:  # a step's noise depends on the step alone, not on the batch
        gen = torch.Generator(images.device).manual_seed(seed * 1_000_003 + 2 * k + (kind == "road_lerf"))
        fields.append(torch.randn((1, c, h, w), generator=gen, device=images.device).expand(b, c, h, w))
    unknown = (~known.view(-1, 1, h, w)).to(out.dtype)
    return out + noise * torch.cat(fields).to(out.dtype) * unknown
