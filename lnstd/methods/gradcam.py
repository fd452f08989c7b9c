"""Grad-CAM on the last block's LN1 output (Selvaraju et al. 2017; pytorch-grad-cam's ViT/Swin layer)."""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from .base import Context, Method, register

__all__ = ["GradCAM"]


@register("gradcam")
class GradCAM(Method):
    """``heat_j = ReLU(sum_c w_c F_jc)``, ``w_c`` = mean over patch tokens of ``dy/dF``."""

    needs_gradient = True

    def __init__(self, adapter: Adapter, blocks: str | int | None = None) -> None:
        # Defined on the last block only: the blocks option does not apply.
        super().__init__(adapter, 1)

    def attention_blocks(self) -> list[int]:
        return []

    def gradient_blocks(self) -> list[int]:
        return []

    def feature_blocks(self) -> list[int]:
        return self.blocks

    def compute(self, ctx: Context) -> torch.Tensor:
        i = self.blocks[-1]
        f, (h, w) = ctx.adapter.patch_features(ctx.capture.blocks[i].features)
        g, _ = ctx.adapter.patch_features(ctx.feature_grads[i])
        weights = g.float().mean(dim=1, keepdim=True)  # (B, 1, C)
        heat = torch.relu((f.float() * weights).sum(dim=-1))
        return heat.reshape(heat.shape[0], h, w)
