"""Attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

import torch

from ..arch.base import WindowMap
from ..relevance import rownorm_with_identity
from .base import ChainMethod, Context, register

__all__ = ["Rollout"]


@register("rollout")
class Rollout(ChainMethod):
    """``R = Â_L ... Â_1`` with ``Â_b = rownorm(I + mean_h A_b)``."""

    residual = False

    def block_matrix(self, ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        return rownorm_with_identity(self.mean_attention(ctx, i, wm), wm)
