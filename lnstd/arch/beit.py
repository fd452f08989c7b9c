"""Adapter for timm ``Beit``: relative position bias per block (or shared), layer scale, class token."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.beit import Attention, Block

from .base import BlockRef, LRPOperands, biased_qkv, split_qkv
from .tokens import lrp_block, token_blocks
from .vit import ViTAdapter

__all__ = ["BeitAdapter"]


class BeitAdapter(ViTAdapter):
    """One window of N = 1 + h*w tokens, as in ViT.

    Readout: ``global_pool="avg"`` (the default, followed by ``fc_norm``) averages ``x[:, 1:]``,
    the patch tokens; ``"token"`` reads the class token. Captured unfused: with ``qkv_bias`` (the
    BEiT models) timm computes q, k, v with ``F.linear`` on the qkv weight, bypassing the qkv
    module, so its hooks cannot see them; the unfused path reads ``A`` with the relative position
    bias already added. For the same reason the LRP walk recomputes q, k, v from the attention's
    input (:meth:`lrp_operands`), and AttnLRP applies its uniform rules at ``A V`` (the input of
    ``proj``) and at ``A``.

    ViTAdapter's checks apply as they are: global_pool "token" or "avg" ("" returns per-token
    features, not logits).
    """

    family = "beit"

    def _find_blocks(self) -> list[BlockRef]:
        return token_blocks(
            self.model,
            {Block: "key"},
            self.family,
            lambda blk, post: lrp_block(blk, post, Attention, blk.attn.proj),
        )

    def lrp_operands(self, block: BlockRef, x: torch.Tensor, kwargs: dict[str, Any]) -> LRPOperands:
        # Attention.forward: q, k, v from one projection with (q_bias, 0, v_bias); the unfused path
        # scales q and adds the relative position biases (constants) to q k^T.
        attn = block.attn
        q, k, v = split_qkv(biased_qkv(attn, x), int(attn.num_heads))
        return LRPOperands(q, k, v, attn.qkv.weight)
