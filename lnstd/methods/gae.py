"""Gradient-weighted attention rollout, ``gae`` (Chefer et al., ICCV 2021)."""

from __future__ import annotations

import torch

from ..capture import BlockView
from .base import BLOCKS, ChainMethod, register

__all__ = ["GAE"]


@register("gae")
class GAE(ChainMethod):
    """``R_b = R_{b-1} + Ā_b R_{b-1}`` with ``Ā_b = mean_h (G_b ⊙ A_b)^+``."""

    options = (BLOCKS,)
    needs_gradient = True

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        return self.gradient_attention(view)
