"""Rank statistics with ties: average ranks, as ``scipy.stats.rankdata`` (method "average") and
``scipy.stats.spearmanr`` define them, batched on tensors."""

from __future__ import annotations

import torch

__all__ = ["average_ranks", "spearman"]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks of a (B, n) tensor, 1..n, tied values sharing the mean of their ranks; float64."""
    s, order = x.double().sort(dim=1, stable=True)
    b, n = s.shape
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(dim=1) - 1  # tie group of each sorted position
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(b, n)
    total = torch.zeros_like(s).scatter_add_(1, group, pos)
    count = torch.zeros_like(s).scatter_add_(1, group, torch.ones_like(s))
    mean = (total / count.clamp(min=1)).gather(1, group)
    return torch.empty_like(mean).scatter_(1, order, mean)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of (B, n) tensors: the Pearson correlation of their average
    ranks (ties share a rank, so tied zeros are not ordered by position). A row with all values tied
    has no ranking: 0 (SciPy says nan)."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)
