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


def assert_window_map_exact(model: torch.nn.Module, grid: int = 11) -> None:
    """Perturbing one input token of each of the first stage's real timm blocks (plain, then
    shifted) changes exactly the outputs of that token's window as ``swin_window_index`` lays it out;
    the two blocks partition the grid differently."""
    from lnstd.arch import swin_window_index

    torch.manual_seed(0)
    maps = []
    for blk in model.layers[0].blocks[:2]:
        x = torch.randn(1, grid, grid, blk.norm1.normalized_shape[0])
        index = swin_window_index(grid, grid, tuple(blk.window_size), tuple(blk.shift_size), x.device)
        with torch.no_grad():
            base = blk(x)
            delta = torch.randn(x.shape[-1])  # not a constant: LayerNorm would erase that
            for p in range(grid * grid):
                x2 = x.clone()
                x2.view(-1, x.shape[-1])[p] += delta
                changed = set(((blk(x2) - base).abs().amax(-1) > 1e-6).flatten().nonzero().flatten().tolist())
                window = index[(index == p).any(1)][0]
                assert changed == set(window[window < grid * grid].tolist()), (p, blk.shift_size)
        maps.append(index)
    assert not torch.equal(maps[0], maps[1]) and any(model.layers[0].blocks[1].shift_size)
