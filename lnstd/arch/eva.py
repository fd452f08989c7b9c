"""Adapter for timm ``Eva`` (EVA, EVA-02): rotary position embedding, SwiGLU, layer scale, prefix tokens."""

from __future__ import annotations

from .base import BlockRef
from .tokens import CHECKED_METHODS, token_blocks
from .vit import ViTAdapter

__all__ = ["EvaAdapter"]


class EvaAdapter(ViTAdapter):
    """One window of N = prefix + h*w tokens, as in ViT.

    Readout: ``global_pool="avg"`` (the EVA-02 default) averages the patch tokens only (timm's
    ``global_pool_nlc`` drops the prefix), ``"token"`` reads the class token. Pre-norm
    ``EvaBlock``: the std weights keys; post-norm ``EvaBlockPostNorm`` (norm1 after attention):
    it weights queries. Captured unfused: the fused kernel sees q, k after the rotary embedding is
    applied to the patch tokens, which no module output exposes, and timm adds the q bias with
    ``F.linear`` on the qkv weight, so the qkv module's hooks do not see q, k, v either.

    ViTAdapter's checks apply as they are: global_pool "token" or "avg", no attention pool
    ("map"), the prefix count (class and register tokens) from the model.
    """

    family = "eva"
    supported_methods = CHECKED_METHODS

    def _find_blocks(self) -> list[BlockRef]:
        return token_blocks(self.model, {"EvaBlock": "key", "EvaBlockPostNorm": "query"}, self.family)
