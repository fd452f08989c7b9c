"""Adapter for timm ``SwinTransformerV2``: cosine window attention, post-norm blocks, patch merging."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2Block
from torch import nn

from .base import BlockRef, LRPOperands, LRPRef, UnsupportedModelError, biased_qkv, split_qkv
from .swin import SwinAdapter

__all__ = ["SwinV2Adapter"]


class SwinV2Adapter(SwinAdapter):
    """Token space of a block = its stage grid, as in Swin v1; windows, shifts and padding are laid
    out as in v1 (roll by -shift, pad, partition), and V2's PatchMerging pads odd grids and takes the
    same 2x2 children (its norm follows the reduction, which the chain does not see).

    The blocks are post-norm, ``x + norm1(attn(x))``: norm1 divides output token i of the attention
    by its std s_i after attention has mixed, so ``lnstd`` weights rows (``std_side="query"``).
    Grad-CAM reads the last block's input, what its attention reads (norm1's output is already
    mixed by that attention). Captured unfused: V2 has no fused kernel.

    LRP: the attention computes q, k, v with ``F.linear`` (q and v biases) and L2-normalises q and k
    with ``F.normalize`` inside its forward, where no module hook reaches: the walk recomputes them
    (:meth:`lrp_operands`), AttnLRP applies its uniform rules at ``A V`` (the input of ``proj``) and at
    ``A``, and its normalisation rule to the ``F.normalize`` calls (``lrp_normalize_calls``).
    """

    family = "swinv2"
    merging = PatchMerging
    lrp_normalize_calls = True

    def _find_blocks(self) -> list[BlockRef]:
        refs: list[BlockRef] = []
        for s, stage in enumerate(self.model.layers):
            for blk in stage.blocks:
                attn = getattr(blk, "attn", None)
                if (
                    not isinstance(blk, SwinTransformerV2Block)
                    or getattr(attn, "attn_drop", None) is None
                    or not hasattr(attn, "logit_scale")
                ):
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__} block {len(refs)} ({type(blk).__name__}) is not "
                        "a timm SwinTransformerV2Block with its cosine WindowAttention"
                    )
                ref = BlockRef(len(refs), s, blk, blk.norm1, attn, attn.attn_drop, std_side="query")
                refs.append(_with_lrp(ref))
        return refs

    def lrp_operands(self, block: BlockRef, x: torch.Tensor, kwargs: dict[str, Any]) -> LRPOperands:
        # WindowAttention.forward: q, k, v from one projection with (q_bias, 0, v_bias); the logits are
        # normalize(q) normalize(k)^T times the clamped, exponentiated logit scale, plus
        # 16 * sigmoid(cpb_mlp(...)) and the shift mask (constants).
        attn = block.attn
        q, k, v = split_qkv(biased_qkv(attn, x), int(attn.num_heads))
        return LRPOperands(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, attn.qkv.weight)


def _with_lrp(ref: BlockRef) -> BlockRef:
    """``x + drop_path1(norm1(attn(x)))``, then ``x + drop_path2(norm2(mlp(x)))`` (reshaped to tokens)."""
    blk, attn = ref.block, ref.attn
    mlp = blk.mlp
    if not isinstance(mlp, Mlp):
        return replace(ref, lrp_problem=f"its MLP is a {type(mlp).__name__}, not timm's Mlp")
    norms = tuple(m for m in (blk.norm1, blk.norm2, mlp.norm) if not isinstance(m, nn.Identity))
    lrp = LRPRef(
        proj=attn.proj, mid=mlp, fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2,
        branch1=blk.drop_path1, branch2=blk.drop_path2, norms=norms, out=attn.proj,
    )  # fmt: skip
    return replace(ref, lrp=lrp)
