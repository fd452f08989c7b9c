"""Slow, literal references for lnstd.metrics.faithfulness: one image at a time, float64, NumPy/SciPy.

``road_impute`` builds ROAD's linear system pixel by pixel from the paper's stencil (Rong et al.
2022; pytorch-grad-cam's ``NoisyLinearImputer``: weight 1/6 for the 4 edge neighbours, 1/12 for the
4 diagonal ones, each unknown pixel = weighted mean of its in-image neighbours) and solves it with
a direct sparse solver. ``road_curves`` follows pytorch-grad-cam's ``RemoveMostRelevantFirst`` /
``RemoveLeastRelevantFirst`` thresholds (``np.percentile``). ``deletion_insertion`` ranks pixels
with ``scipy.stats.rankdata`` (ties: average rank). pytorch-grad-cam itself is not a dependency
(it pulls OpenCV and matplotlib); tests/test_faithfulness.py also checks against it when installed.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch
from scipy.stats import rankdata

WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
           (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}  # fmt: skip


def road_impute(img: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(C, H, W) float64 image with the pixels where ``known`` (H, W) is False imputed."""
    c, h, w = img.shape
    flat = img.reshape(c, -1)
    kn = known.ravel()
    idx = np.flatnonzero(~kn)
    var = -np.ones(h * w, int)
    var[idx] = np.arange(len(idx))
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(idx), c))
    for e, p in enumerate(idx):
        y, x = divmod(int(p), w)
        total = 0.0
        for (dy, dx), wt in WEIGHTS.items():
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            total += wt
            q = yy * w + xx
            if kn[q]:
                rhs[e] += wt * flat[:, q]
            else:
                rows.append(e), cols.append(var[q]), vals.append(-wt)
        rows.append(e), cols.append(e), vals.append(total)
    out = flat.astype(np.float64).copy()
    if len(idx):
        a = sp.csc_matrix((vals, (rows, cols)), shape=(len(idx), len(idx)))
        out[:, idx] = np.asarray(spl.spsolve(a, rhs)).reshape(len(idx), c).T
    return out.reshape(c, h, w)


def _prob(model, img: np.ndarray, target: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(img, dtype=torch.float32)[None]).double()
    return float(logits.softmax(1)[0, target])


def road_curves(model, img: np.ndarray, cam: np.ndarray, target: int, percentiles) -> tuple[list, list]:
    """MoRF and LeRF probabilities of one image at each percentile; ``cam`` (H, W) at image size."""
    morf, lerf = [], []
    for q in percentiles:
        keep = cam < np.percentile(cam, q)  # RemoveMostRelevantFirst: impute the rest
        morf.append(_prob(model, road_impute(img, keep), target))
        inv = 1 - cam  # RemoveLeastRelevantFirst passes 1 - cam
        keep = inv < np.percentile(inv, q)
        lerf.append(_prob(model, road_impute(img, keep), target))
    return morf, lerf


def deletion_insertion(
    model, img: np.ndarray, cam: np.ndarray, target: int, steps: int, baseline: float
) -> tuple[list, list]:
    """Deletion and insertion curves of one image (steps + 1 points each), ``cam`` at image size."""
    h, w = img.shape[1:]
    n = h * w
    rank = rankdata(-cam.ravel(), method="average") - 1  # 0 = most relevant, ties averaged
    dele, ins = [], []
    for j in range(steps + 1):
        k = round(j / steps * n)
        top = (rank < k).reshape(h, w)
        dele.append(_prob(model, np.where(top, baseline, img), target))
        ins.append(_prob(model, np.where(top, img, baseline), target))
    return dele, ins


def trapezoid(curve: list[float]) -> float:
    """Area under a curve sampled at equal steps over [0, 1]."""
    return float(np.trapezoid(curve, dx=1 / (len(curve) - 1)))
