"""Test helpers: small timm models with random weights (pretrained=False) and fixed seeds."""

from __future__ import annotations

import os

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

# One thread per pytest-xdist worker (two workers share the 2 cores), two without xdist.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def make_vit_token(seed: int = 0, **kw) -> VisionTransformer:
    """Class-token ViT, 4x6 patch grid (non-square input)."""
    torch.manual_seed(seed)
    cfg = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def make_vit_avg_reg(seed: int = 1, **kw) -> VisionTransformer:
    """Avg-pool ViT with register tokens, qk-norm and layer-scale."""
    torch.manual_seed(seed)
    cfg = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=4,
        num_classes=5,
        class_token=False,
        global_pool="avg",
        reg_tokens=2,
        qk_norm=True,
        init_values=0.5,
        no_embed_class=True,
    )
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def make_swin(seed: int = 2, **kw) -> SwinTransformer:
    """Swin with window 5 on an 11x11 stage grid: padded windows, shifts, odd-size patch merging."""
    torch.manual_seed(seed)
    cfg = dict(
        img_size=44, patch_size=4, window_size=5, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=6
    )
    cfg.update(kw)
    return SwinTransformer(**cfg).eval()


def sharpen(model: torch.nn.Module, scale: float = 4.0) -> torch.nn.Module:
    """Random-init ViTs attend almost uniformly; scaling q/k weights gives peaked, realistic attention."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight"):
                d = p.shape[0] // 3
                p[: 2 * d] *= scale
    return model


def images_for(model: torch.nn.Module, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=g)
