"""Gradient-weighted attention rollout, ``gae`` (Chefer et al., ICCV 2021)."""

from __future__ import annotations

import torch

from ..arch.base import WindowMap
from .base import ChainMethod, Context, register

__all__ = ["GAE"]


@register("gae")
class GAE(ChainMethod):
    """``R_b = R_{b-1} + Ā_b R_{b-1}`` with ``Ā_b = mean_h (G_b ⊙ A_b)^+``."""

    needs_gradient = True

    def block_matrix(self, ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        return self.gradient_attention(ctx, i, wm)
