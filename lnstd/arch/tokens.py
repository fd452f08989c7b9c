"""What the single-stage (ViT-like) families added after ViT share: their block list and its LRP view."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from torch import nn

from .base import BlockRef, LRPRef, UnsupportedModelError
from .vit import lrp_mlp

__all__ = ["lrp_block", "token_blocks"]


def token_blocks(
    model: nn.Module,
    std_side: Mapping[str, str],
    family: str,
    lrp: Callable[[nn.Module, bool], LRPRef | str],
) -> list[BlockRef]:
    """``model.blocks`` as BlockRefs, captured unfused.

    Args:
        model: a model whose ``blocks`` each hold ``norm1`` and an ``attn`` with an ``attn_drop``
            dropout (where timm's unfused path exposes the attention probabilities).
        std_side: accepted block class name -> where its norm1 sits: ``"key"`` (pre-norm, before
            the attention) or ``"query"`` (post-norm, after it).
        family: the family name, for the error message.
        lrp: (block, whether it is post-norm) -> its LRP view, or why the LRP rules do not know it.
    """
    refs = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        drop = getattr(attn, "attn_drop", None)
        norm1 = getattr(blk, "norm1", None)
        side = std_side.get(type(blk).__name__)
        if side is None or not isinstance(drop, nn.Dropout) or norm1 is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} block {i} is a {type(blk).__name__} with "
                f"{type(attn).__name__} attention; lnstd supports {family} blocks of type "
                f"{', '.join(std_side)} with timm's attention"
            )
        view = lrp(blk, side == "query")
        ref = BlockRef(i, 0, blk, norm1, attn, drop, std_side=side)
        refs.append(replace(ref, lrp=view) if isinstance(view, LRPRef) else replace(ref, lrp_problem=view))
    if not refs:
        raise UnsupportedModelError(f"{type(model).__name__} has no blocks")
    return refs


def lrp_block(blk: nn.Module, post: bool, attention: str, out: nn.Module) -> LRPRef | str:
    """The LRP view of a block ``x + drop_path1(...attn...)``, ``+ drop_path2(...mlp...)`` (pre- or
    post-norm, layer-scale inside the branch) whose attention is of class ``attention``.

    Args:
        blk: the block (``norm1``, ``attn``, ``norm2``, ``mlp``, ``drop_path1``, ``drop_path2``).
        post: whether its norms follow the branches (``x + norm1(attn(x))``).
        attention: the attention class the LRP rules are written for; others are refused.
        out: the module whose input is the attention output ``A V`` (heads merged).
    """
    attn, mlp = blk.attn, blk.mlp
    if type(attn).__name__ != attention:
        return f"its {type(attn).__name__} attention is not {attention}, for which the LRP rules are written"
    if getattr(attn, "gate", None) is not None:
        return "its attention output is gated (x * sigmoid(gate(x))), for which no LRP rule is implemented"
    parts = lrp_mlp(mlp)
    if parts is None:
        return f"its MLP is a {type(mlp).__name__}; the LRP rules know Mlp, SwiGLU and GluMlp"
    fc1, gates = parts
    keep = (blk.norm1, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
    keep += (getattr(attn, "norm", None), blk.norm2, getattr(mlp, "norm", None))
    return LRPRef(
        proj=attn.proj, mid=mlp if post else blk.norm2, fc1=fc1, act=mlp.act, fc2=mlp.fc2,
        branch1=blk.drop_path1, branch2=blk.drop_path2,
        norms=tuple(m for m in keep if m is not None and not isinstance(m, nn.Identity)),
        gate_inputs=gates, out=out,
    )  # fmt: skip
