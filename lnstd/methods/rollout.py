"""Attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

import torch

from ..capture import BlockView
from ..relevance import rownorm_with_identity
from .base import BLOCKS, ChainMethod, register

__all__ = ["Rollout"]


@register("rollout")
class Rollout(ChainMethod):
    """``R = Â_L ... Â_1`` with ``Â_b = rownorm(I + mean_h A_b)``."""

    options = (BLOCKS,)
    residual = False

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        return rownorm_with_identity(self.mean_attention(view), view.wm)
