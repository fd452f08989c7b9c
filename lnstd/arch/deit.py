"""Adapter for timm ``VisionTransformerDistilled`` (DeiT with a distillation token)."""

from __future__ import annotations

import torch
from torch import nn

from .base import UnsupportedModelError
from .tokens import CHECKED_METHODS
from .vit import ViTAdapter

__all__ = ["DeiTAdapter"]


class DeiTAdapter(ViTAdapter):
    """A ViT with two prefix tokens, class (0) and distillation (1), and two heads.

    In eval the model returns ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``, so the readout is the
    average of rows 0 and 1 of R. Blocks are timm's ``Block`` with ``Attention``: everything else,
    including the fused capture, is the ViT adapter's.
    """

    family = "deit"
    supported_methods = CHECKED_METHODS

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.num_prefix != 2 or getattr(model, "reg_token", None) is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {self.num_prefix} prefix tokens; lnstd supports the "
                "distilled DeiT layout: class token, distillation token, then patches"
            )

    def readout_start(self, input_shape: torch.Size, batch: int, device: torch.device) -> torch.Tensor:
        v = torch.zeros(batch, input_shape[1], device=device)
        v[:, :2] = 0.5  # the two heads' logits are averaged
        return v
