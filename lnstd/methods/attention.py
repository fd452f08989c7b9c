"""Raw attention of the last block (baseline of Chefer et al. 2021a)."""

from __future__ import annotations

import torch

from ..arch.base import Adapter, WindowMap
from .base import ChainMethod, Context, register

__all__ = ["RawAttention"]


@register("attention")
class RawAttention(ChainMethod):
    """``mean_h A_L`` of the last block, read out directly (no chain)."""

    residual = False

    def __init__(self, adapter: Adapter, blocks: str | int | None = None) -> None:
        # Defined on the last block only: the blocks option does not apply.
        super().__init__(adapter, 1)

    def block_matrix(self, ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        return self.mean_attention(ctx, i, wm)
