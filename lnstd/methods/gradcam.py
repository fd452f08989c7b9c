"""Grad-CAM on the last block's LN1 output (Selvaraju et al. 2017; pytorch-grad-cam's ViT/Swin layer).

That is the input of the last attention; in post-norm blocks (Swin V2), whose LN1 follows the
attention, the block's input takes that role (docs/families.md).
"""

from __future__ import annotations

import torch

from ..capture import Needs
from .base import Method, PassResult, register

__all__ = ["GradCAM"]


@register("gradcam")
class GradCAM(Method):
    """``heat_j = ReLU(sum_c w_c F_jc)``, ``w_c`` = mean over patch tokens of ``dy/dF``."""

    needs_gradient = True  # defined on the last block only: it takes no options

    def needs(self) -> Needs:
        return Needs(features={self.blocks[-1]})

    def compute(self, ctx: PassResult) -> torch.Tensor:
        i = self.blocks[-1]
        f, (h, w) = ctx.adapter.patch_features(ctx.features[i])
        g, _ = ctx.adapter.patch_features(ctx.feature_grads[i])
        weights = g.float().mean(dim=1, keepdim=True)  # (B, 1, C)
        heat = torch.relu((f.float() * weights).sum(dim=-1))
        return heat.reshape(heat.shape[0], h, w)
