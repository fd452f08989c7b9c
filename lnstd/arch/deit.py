"""Adapter for timm ``VisionTransformerDistilled`` (DeiT with a distillation token)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .base import HeadRef, UnsupportedModelError
from .vit import ViTAdapter

__all__ = ["DeiTAdapter"]


class DeiTAdapter(ViTAdapter):
    """A ViT with two prefix tokens, class (0) and distillation (1), and two heads.

    In eval the model returns ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``, so the readout is the
    average of rows 0 and 1 of R, and the LRP head has two Linear heads on those rows. Blocks are
    timm's ``Block`` with ``Attention``: everything else, including the fused capture and the LRP
    rules inside the blocks, is the ViT adapter's.
    """

    family = "deit"

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

    def lrp_head(self) -> HeadRef | None:
        head = super().lrp_head()
        if head is None or not isinstance(self.model.head_dist, nn.Linear):
            return None
        # forward_head: head(x[:, 0]) and head_dist(x[:, 1]) (head_drop between), averaged; no fc_norm
        return replace(head, token_heads=((self.model.head, 0), (self.model.head_dist, 1)))
