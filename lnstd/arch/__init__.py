"""The only place that knows timm internals: one adapter per architecture family."""

from __future__ import annotations

from torch import nn

from .base import Adapter, BlockRef, UnsupportedModelError, WindowMap, token_std
from .beit import BeitAdapter
from .deit import DeiTAdapter
from .eva import EvaAdapter
from .swin import SwinAdapter, swin_window_index
from .swinv2 import SwinV2Adapter
from .vit import ViTAdapter

__all__ = [
    "SUPPORTED_FAMILIES",
    "Adapter",
    "BeitAdapter",
    "BlockRef",
    "DeiTAdapter",
    "EvaAdapter",
    "SwinAdapter",
    "SwinV2Adapter",
    "UnsupportedModelError",
    "ViTAdapter",
    "WindowMap",
    "get_adapter",
    "swin_window_index",
    "token_std",
]

# timm class -> adapter, most specific class first (VisionTransformerDistilled is a VisionTransformer).
SUPPORTED_FAMILIES = (
    ("timm.models.deit.VisionTransformerDistilled", DeiTAdapter),
    ("timm.models.vision_transformer.VisionTransformer", ViTAdapter),
    ("timm.models.swin_transformer.SwinTransformer", SwinAdapter),
    ("timm.models.swin_transformer_v2.SwinTransformerV2", SwinV2Adapter),
    ("timm.models.eva.Eva", EvaAdapter),
    ("timm.models.beit.Beit", BeitAdapter),
)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a supported timm model (see ``SUPPORTED_FAMILIES``); a clear error otherwise."""
    import importlib

    for path, adapter in SUPPORTED_FAMILIES:
        module, name = path.rsplit(".", 1)
        if isinstance(model, getattr(importlib.import_module(module), name)):
            return adapter(model)
    raise UnsupportedModelError(
        f"cannot explain a {type(model).__module__}.{type(model).__name__}: lnstd supports timm "
        "VisionTransformer (vit_*, deit_*, ...), VisionTransformerDistilled (deit_*_distilled_*), "
        "SwinTransformer (swin_*), SwinTransformerV2 (swinv2_*), Eva (eva02_*, ...) and Beit (beit_*) models"
    )
