"""Adapter for timm ``Beit``: relative position bias per block (or shared), layer scale, class token."""

from __future__ import annotations

from .base import BlockRef
from .tokens import CHECKED_METHODS, token_blocks
from .vit import ViTAdapter

__all__ = ["BeitAdapter"]


class BeitAdapter(ViTAdapter):
    """One window of N = 1 + h*w tokens, as in ViT.

    Readout: ``global_pool="avg"`` (the default, followed by ``fc_norm``) averages ``x[:, 1:]``,
    the patch tokens; ``"token"`` reads the class token. Captured unfused: with ``qkv_bias`` (the
    BEiT models) timm computes q, k, v with ``F.linear`` on the qkv weight, bypassing the qkv
    module, so its hooks cannot see them; the unfused path reads ``A`` with the relative position
    bias already added.

    ViTAdapter's checks apply as they are: global_pool "token" or "avg" ("" returns per-token
    features, not logits).
    """

    family = "beit"
    supported_methods = CHECKED_METHODS

    def _find_blocks(self) -> list[BlockRef]:
        return token_blocks(self.model, {"Block": "key"}, self.family)
