"""Transformer attribution (Chefer, Gur & Wolf, CVPR 2021): LRP relevance of the attention times its
gradient, rolled out with the identity. Rules and choices: docs/lrp.md.

A chain method in the shared pass, not a pass of its own: the relevance walk needs only activations
the forward pass already produces and the one-hot target, and it runs top-down block by block while
the shared backward pass delivers each block's attention gradient. So ``transformer_attribution``,
``lnstd`` with ``base="transformer_attribution"`` and the gradient methods share one forward and one
backward pass, and one walk.
"""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from ..capture import BlockView, Needs
from .base import BLOCKS, ChainMethod, PassResult, register

__all__ = ["TransformerAttribution"]


@register("transformer_attribution")
class TransformerAttribution(ChainMethod):
    """``R_b = R_{b-1} + M_b R_{b-1}``, ``M_b = mean_h (G_b ⊙ R_A_b)^+``, R_A_b the LRP relevance of A."""

    options = (BLOCKS,)  # the last k blocks: the authors' start_layer = L - k
    needs_gradient = True

    def __init__(self, adapter: Adapter, **options: object) -> None:
        adapter.check_lrp(self.name)
        super().__init__(adapter, **options)

    def needs(self) -> Needs:
        n = super().needs()
        n.relevance = set(self.blocks)
        return n

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        return self.relevance_attention(view)

    def completeness(
        self, heat: torch.Tensor, score: torch.Tensor, ctx: PassResult | None
    ) -> torch.Tensor | None:
        """The walk's relevance on the patch tokens at the first chained block's input, over the one it
        starts with (1, the one-hot target)."""
        return None if ctx is None else ctx.relevance_totals[self.blocks[0]]
