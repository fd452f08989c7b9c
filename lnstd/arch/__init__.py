"""The only place that knows timm internals: one adapter per architecture family."""

from __future__ import annotations

from torch import nn

from .base import Adapter, BlockRef, UnsupportedModelError, WindowMap, token_std
from .swin import SwinAdapter, swin_window_index
from .vit import ViTAdapter

__all__ = [
    "Adapter",
    "BlockRef",
    "SwinAdapter",
    "UnsupportedModelError",
    "ViTAdapter",
    "WindowMap",
    "get_adapter",
    "swin_window_index",
    "token_std",
]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a timm VisionTransformer or SwinTransformer (v1); a clear error otherwise."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return ViTAdapter(model)
    if isinstance(model, SwinTransformer):
        return SwinAdapter(model)
    raise UnsupportedModelError(
        f"cannot explain a {type(model).__module__}.{type(model).__name__}: lnstd supports timm "
        "VisionTransformer (vit_*, deit_*, ...) and SwinTransformer v1 (swin_*) models"
    )
