"""AttnLRP (Achtibat et al., ICML 2024): LRP through the whole model in one modified backward pass.
Rules and choices: docs/lrp.md.

A pass method: its rules change the gradients of the normalisations, activations and q/k/v, so it
cannot share the plain backward pass the other methods read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..arch.base import Adapter
from ..capture import restored
from ..lrp import ModifiedGradients
from .base import PassMethod, PassResult, register

__all__ = ["AttnLRP"]


@register("attnlrp")
class AttnLRP(PassMethod):
    """Token relevance at the patch embedding output: ``sum_c x_c dy/dx_c`` under AttnLRP's rules."""

    needs_gradient = True

    def __init__(self, adapter: Adapter, **options: Any) -> None:
        adapter.check_lrp(self.name, gated=True)
        super().__init__(adapter, **options)

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor, autocast: Callable[[], Any]
    ) -> torch.Tensor:
        model = self.adapter.model
        rules = ModifiedGradients(self.adapter)
        with restored(model, self.adapter, unfused=rules.unfused), rules, torch.enable_grad():
            with autocast():
                logits = model(images)
            score = logits.float().gather(1, targets[:, None]).sum()
            if rules.tokens is None:
                raise RuntimeError("the patch embedding did not run")
            (grad,) = torch.autograd.grad(score, rules.tokens)
            return self.adapter.embedding_grid(rules.tokens.detach().float() * grad.float())

    def completeness(
        self, heat: torch.Tensor, score: torch.Tensor, ctx: PassResult | None
    ) -> torch.Tensor | None:
        """The map's sum over the explained logit, where the relevance starts."""
        return heat.double().sum(dim=(1, 2)).div(score.double()).float()
