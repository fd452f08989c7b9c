"""Adapter for timm ``SwinTransformerV2``: cosine window attention, post-norm blocks, patch merging."""

from __future__ import annotations

from .base import BlockRef, UnsupportedModelError
from .swin import SwinAdapter
from .tokens import CHECKED_METHODS

__all__ = ["SwinV2Adapter"]


class SwinV2Adapter(SwinAdapter):
    """Token space of a block = its stage grid, as in Swin v1; windows, shifts and padding are laid
    out as in v1 (roll by -shift, pad, partition), and V2's PatchMerging pads odd grids and takes the
    same 2x2 children (its norm follows the reduction, which the chain does not see).

    The blocks are post-norm, ``x + norm1(attn(x))``: norm1 divides output token i of the attention
    by its std s_i after attention has mixed, so ``lnstd`` weights rows (``std_side="query"``).
    Grad-CAM reads the last block's input, what its attention reads (norm1's output is already
    mixed by that attention). Captured unfused: V2 has no fused kernel.
    """

    family = "swinv2"
    supported_methods = CHECKED_METHODS

    def _find_blocks(self) -> list[BlockRef]:
        refs: list[BlockRef] = []
        for s, stage in enumerate(self.model.layers):
            for blk in stage.blocks:
                attn = getattr(blk, "attn", None)
                if (
                    type(blk).__name__ != "SwinTransformerV2Block"
                    or getattr(attn, "attn_drop", None) is None
                    or not hasattr(attn, "logit_scale")
                ):
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__} block {len(refs)} ({type(blk).__name__}) is not "
                        "a timm SwinTransformerV2Block with its cosine WindowAttention"
                    )
                refs.append(BlockRef(len(refs), s, blk, blk.norm1, attn, attn.attn_drop, std_side="query"))
        return refs
