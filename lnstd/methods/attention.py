"""Raw attention of the last block (baseline of Chefer et al. 2021a)."""

from __future__ import annotations

import torch

from ..capture import BlockView
from .base import ChainMethod, register

__all__ = ["RawAttention"]


@register("attention")
class RawAttention(ChainMethod):
    """``mean_h A_L`` of the last block, read out directly (no chain)."""

    residual = False  # defined on the last block only: it takes no options

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        return self.mean_attention(view)
