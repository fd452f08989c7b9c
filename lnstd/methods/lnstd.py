"""LayerNorm-std weighted relevance, ``lnstd`` (arXiv 2311.11378): this project's namesake."""

from __future__ import annotations

from typing import Literal

import torch

from ..arch.base import Adapter, WindowMap
from ..relevance import normalize
from .base import ChainMethod, Context, register

__all__ = ["LNStd"]

STD_MODES = ("inverse", "multiply", "none")
NORMALIZE_MODES = ("matrix", "row", "none")


@register("lnstd")
class LNStd(ChainMethod):
    """``R_b = R_{b-1} + Ã_b R_{b-1}`` with ``Ã_b = norm(Ā_b · diag(1 / s_b))``.

    Args:
        adapter: architecture adapter.
        blocks: "all" or the last k blocks (default: all for ViT, 2 for Swin).
        std: column weights from the LN1 token std s: "inverse" (1/s, the paper's reading),
            "multiply" (s) or "none".
        normalize: "matrix" (each matrix sums to one), "row" (each row does) or "none".
    """

    needs_gradient = True
    uses_token_std = True

    def __init__(
        self,
        adapter: Adapter,
        blocks: str | int | None = None,
        std: Literal["inverse", "multiply", "none"] = "inverse",
        normalize: Literal["matrix", "row", "none"] = "matrix",
    ) -> None:
        if std not in STD_MODES:
            raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        super().__init__(adapter, blocks)
        self.std = std
        self.normalize = normalize

    def block_matrix(self, ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        m = self.gradient_attention(ctx, i, wm)
        if self.std != "none":
            s = ctx.capture.blocks[i].token_std
            weight = 1.0 / s if self.std == "inverse" else s
            m = m * wm.to_windows(weight).unsqueeze(2)  # scales column j: M · diag(w)
        return normalize(m, self.normalize)
