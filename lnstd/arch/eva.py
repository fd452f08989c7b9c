"""Adapter for timm ``Eva`` (EVA, EVA-02): rotary position embedding, SwiGLU, layer scale, prefix tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

from .base import BlockRef, LRPOperands, UnsupportedModelError, biased_qkv, split_qkv
from .tokens import lrp_block, token_blocks
from .vit import ViTAdapter

__all__ = ["EvaAdapter"]


class EvaAdapter(ViTAdapter):
    """One window of N = prefix + h*w tokens, as in ViT.

    Readout: ``global_pool="avg"`` (the EVA-02 default) averages the patch tokens only (timm's
    ``global_pool_nlc`` drops the prefix), ``"token"`` reads the class token. Pre-norm
    ``EvaBlock``: the std weights keys; post-norm ``EvaBlockPostNorm`` (norm1 after attention):
    it weights queries. Captured unfused: the fused kernel sees q, k after the rotary embedding is
    applied to the patch tokens, which no module output exposes, and timm adds the q bias with
    ``F.linear`` on the qkv weight, so the qkv module's hooks do not see q, k, v either. For the same
    reasons the LRP walk recomputes q, k, v and the rotation from the attention's input and its
    ``rope`` argument (:meth:`lrp_operands`), and AttnLRP applies its uniform rules at ``A V`` (the
    input of the attention's output norm) and at ``A``.

    ViTAdapter's checks apply as they are: global_pool "token" or "avg", no attention pool
    ("map"), the prefix count (class and register tokens) from the model.
    """

    family = "eva"

    def _find_blocks(self) -> list[BlockRef]:
        return token_blocks(
            self.model,
            {EvaBlock: "key", EvaBlockPostNorm: "query"},
            self.family,
            lambda blk, post: lrp_block(blk, post, EvaAttention, blk.attn.norm),
        )

    def lrp_operands(self, block: BlockRef, x: torch.Tensor, kwargs: dict[str, Any]) -> LRPOperands:
        # EvaAttention.forward: q, k, v (fused with (q_bias, 0, v_bias), or three projections), q/k
        # norms, then the rotary embedding on the patch tokens (the first num_prefix_tokens skipped).
        attn, heads = block.attn, int(block.attn.num_heads)
        b, t, _ = x.shape
        if attn.qkv is not None:
            q, k, v = split_qkv(biased_qkv(attn, x), heads)
            weight = attn.qkv.weight
        else:
            proj = (attn.q_proj, attn.k_proj, attn.v_proj)
            q, k, v = (
                F.linear(x.float(), p.weight.float(), None if p.bias is None else p.bias.float())
                .reshape(b, t, heads, -1)
                .transpose(1, 2)
                for p in proj
            )
            weight = torch.cat([p.weight for p in proj])
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = kwargs.get("rope")
        if rope is None:
            return LRPOperands(q, k, v, weight)
        rope = rope.float()
        if rope.ndim not in (2, 3):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: a rotary embedding of shape {tuple(rope.shape)} (per image) "
                "is not one the LRP walk knows"
            )
        npt, half = int(attn.num_prefix_tokens), bool(getattr(attn, "rotate_half", False))

        def rotate(u: torch.Tensor) -> torch.Tensor:  # as EvaAttention.forward
            return torch.cat([u[:, :, :npt], apply_rot_embed_cat(u[:, :, npt:], rope, half=half)], dim=2)

        # The rotation is linear: its matrix at patch token t is the rotation of each basis vector there,
        # (d_in, heads or 1, N, d_out) -> (heads or 1, N, d_out, d_in); the prefix tokens are not rotated.
        d, n = q.shape[-1], t - npt
        groups = rope.shape[0] if rope.ndim == 3 else 1
        basis = torch.eye(d, dtype=q.dtype, device=q.device)[:, None, None, :].expand(d, groups, n, d)
        rotation = apply_rot_embed_cat(basis, rope, half=half).permute(1, 2, 3, 0)
        return LRPOperands(rotate(q), rotate(k), v, weight, rotation=rotation, q_in=q, k_in=k)
