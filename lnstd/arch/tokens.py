"""What the single-stage (ViT-like) families added after ViT share: their block list and its LRP view."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from .base import BlockRef, LRPRef, UnsupportedModelError
from .vit import lrp_block, lrp_fields

__all__ = ["lrp_block", "token_blocks"]


def token_blocks(
    model: nn.Module,
    std_side: Mapping[type[nn.Module], str],
    family: str,
    lrp: Callable[[nn.Module, bool], LRPRef | str],
) -> list[BlockRef]:
    """``model.blocks`` as BlockRefs, captured unfused.

    Args:
        model: a model whose ``blocks`` each hold ``norm1`` and an ``attn`` with an ``attn_drop``
            dropout (where timm's unfused path exposes the attention probabilities).
        std_side: accepted block class (subclasses included) -> where its norm1 sits: ``"key"``
            (pre-norm, before the attention) or ``"query"`` (post-norm, after it).
        family: the family name, for the error message.
        lrp: (block, whether it is post-norm) -> its LRP view, or why the LRP rules do not know it.
    """
    refs = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        drop = getattr(attn, "attn_drop", None)
        norm1 = getattr(blk, "norm1", None)
        side = next((s for cls, s in std_side.items() if isinstance(blk, cls)), None)
        if side is None or not isinstance(drop, nn.Dropout) or norm1 is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} block {i} is a {type(blk).__name__} with "
                f"{type(attn).__name__} attention; lnstd supports {family} blocks of type "
                f"{', '.join(cls.__name__ for cls in std_side)} with timm's attention"
            )
        refs.append(
            BlockRef(i, 0, blk, norm1, attn, drop, std_side=side, **lrp_fields(lrp(blk, side == "query")))
        )
    if not refs:
        raise UnsupportedModelError(f"{type(model).__name__} has no blocks")
    return refs
