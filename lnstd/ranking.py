"""Methods ranked by a per-image figure, with bootstrap intervals over images and the paired
difference to the best method: the report's "Which map to believe" section (``--faithfulness``).

Pure NumPy on the per-row values the report has already read. Rows are paired by (image, target):
only those every ranked method has a value for count, so every method is judged on the same
images. Intervals are 95% percentile bootstraps over images (at most ``MAX_IMAGES`` of them, a
seeded sample, so the cost does not grow with the dataset).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from .metrics.registry import FAITHFULNESS_METRICS, METRICS, higher_is_better

__all__ = ["MAX_IMAGES", "Ranked", "rank_methods", "ranking_section"]

MAX_IMAGES = 20_000
DRAWS = 1000


@dataclass(frozen=True)
class Ranked:
    """One method's place for one figure."""

    method: str
    mean: float
    low: float  # 95% bootstrap interval of the mean
    high: float
    diff: float  # mean paired difference to the best method (0 for the best)
    diff_low: float
    diff_high: float

    @property
    def distinguishable(self) -> bool:
        """The paired interval to the best method excludes 0."""
        return self.diff_low > 0 or self.diff_high < 0


def rank_methods(
    values: dict[str, np.ndarray], higher: bool, draws: int = DRAWS, seed: int = 0
) -> list[Ranked]:
    """Methods best first, from ``values[method]``: (N,) per-image figures on the same N images."""
    names = list(values)
    a = np.stack([np.asarray(values[m], np.float64) for m in names])  # (M, N)
    rng = np.random.default_rng(seed)
    if a.shape[1] > MAX_IMAGES:
        a = a[:, np.sort(rng.choice(a.shape[1], MAX_IMAGES, replace=False))]
    n = a.shape[1]
    means = a.mean(1)
    order = np.argsort(-means if higher else means, kind="stable")
    best = a[order[0]]
    boot = np.empty((draws, len(names)))
    diff = np.empty((draws, len(names)))
    for k in range(draws):
        idx = rng.integers(0, n, n)
        boot[k] = a[:, idx].mean(1)
        diff[k] = (a[:, idx] - best[idx]).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    dlo, dhi = np.percentile(diff, [2.5, 97.5], axis=0)
    d = (a - best).mean(1)
    return [Ranked(names[i], float(means[i]), float(lo[i]), float(hi[i]), float(d[i]), float(dlo[i]),
                   float(dhi[i])) for i in order]  # fmt: skip


def _paired(rows: list[dict], metric: str, methods: list[str]) -> dict[str, np.ndarray]:
    """Per method, the figure on the (image, target) pairs every method has it for."""
    by: dict[str, dict[tuple, float]] = {m: {} for m in methods}
    for r in rows:
        v = r.get(metric)
        if r["method"] in by and v is not None and np.isfinite(v):
            by[r["method"]][(r["image_id"], r["target"])] = float(v)
    common = set.intersection(*(set(d) for d in by.values())) if by else set()
    keys = sorted(common)
    return {m: np.array([by[m][k] for k in keys]) for m in methods} if keys else {}


def ranking_section(rows: list[dict], methods: list[str]) -> str:
    """The report's "Which map to believe" section (empty without faithfulness columns)."""
    ranked = {}
    for metric in FAITHFULNESS_METRICS:
        values = _paired(rows, metric, methods)
        n = len(next(iter(values.values()))) if values else 0
        if n >= 2:
            ranked[metric] = (rank_methods(values, higher_is_better(metric)), n)
    if not ranked:
        return ""
    out = ["<h2 id='faithfulness'>Which map to believe</h2>"]
    lead = next((m for m in ("road_gap", "deletion_auc", "insertion_auc") if m in ranked), next(iter(ranked)))
    places, n = ranked[lead]
    ties = [p.method for p in places[1:] if not p.distinguishable]
    reading = (
        f"On these {n} images, {places[0].method}'s maps are the most faithful to this model by "
        f"{lead}" + (f"; {', '.join(ties)} {'is' if len(ties) == 1 else 'are'} not distinguishable from it"
                     if ties else "; every other method is measurably less faithful") + "."
    )  # fmt: skip
    out.append(f"<p id='faithfulness-reading'>{html.escape(reading)}</p>")
    out.append(
        "<p class='muted'>Per figure, methods best first: mean over the images every method was scored "
        "on, its 95% bootstrap interval over images, and the paired difference to the best method "
        "on the same images (an interval that contains 0: not distinguishable).</p>"
    )
    for metric, (places, n) in ranked.items():
        arrow = "↑" if higher_is_better(metric) else "↓"
        out.append(f"<h3>{html.escape(metric)} {arrow}: {html.escape(METRICS[metric].description)} "
                   f"({n} images)</h3>")  # fmt: skip
        body = "".join(
            f"<tr data-metric='{metric}' data-method='{html.escape(p.method)}' data-rank='{i + 1}'>"
            f"<td>{i + 1}</td><td class='k'>{html.escape(p.method)}</td><td>{p.mean:.4f}</td>"
            f"<td>[{p.low:.4f}, {p.high:.4f}]</td><td>{_versus_best(p, i)}</td></tr>"
            for i, p in enumerate(places)
        )
        out.append(
            "<div class='box'><table class='faithfulness'><tr><th>rank</th><th class='k'>method</th>"
            "<th>mean</th><th>95% interval</th><th>paired difference to the best</th></tr>"
            + body + "</table></div>"
        )  # fmt: skip
    return "".join(out)


def _versus_best(p: Ranked, place: int) -> str:
    if place == 0:
        return "best"
    note = "" if p.distinguishable else " (not distinguishable)"
    return f"{p.diff:+.4f} [{p.diff_low:+.4f}, {p.diff_high:+.4f}]{note}"
