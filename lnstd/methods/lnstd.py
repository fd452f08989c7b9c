"""LayerNorm-std weighted relevance, ``lnstd`` (arXiv 2311.11378): this project's namesake."""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from ..capture import BlockView, Needs
from ..choices import BASES, NORMALIZE_MODES, STD_MODES
from ..relevance import normalize
from .base import BLOCKS, ChainMethod, Option, register

__all__ = ["LNStd"]


@register("lnstd")
class LNStd(ChainMethod):
    """``R_b = R_{b-1} + Ã_b R_{b-1}`` with ``Ã_b = norm(Ā_b · diag(1 / s_b))``.

    Options: ``base`` (the per-block matrix the std weighting applies to: "gae", ``Ā_b``, or
    "transformer_attribution", ``mean_h (G_b ⊙ R_A_b)^+`` with the LRP relevance of A, docs/lrp.md),
    ``blocks`` ("all" or the last k; default all, Swin the last 2), ``std`` (column
    weights from the LN1 token std s: "inverse" 1/s, the paper's reading, "multiply" s, or "none")
    and ``normalize`` ("matrix": each matrix sums to one, "row", or "none"). Where the LayerNorm
    follows the attention (Swin V2's post-norm) it divides output token i, so the weights apply to
    the rows instead (``diag(1/s) · Ā``); see docs/methods.md.
    """

    options = (
        Option(
            "blocks", "all", help=BLOCKS.help + " (Swin: the paper's setting)",
            family_defaults={"swin": 2, "swinv2": 2},
        ),
        Option("std", "inverse", STD_MODES, "weight by the LayerNorm token std: 1/s, s or not at all"),
        Option("normalize", "matrix", NORMALIZE_MODES, "rescale each block's matrix to sum 1 (or each row)"),
        Option("base", "gae", BASES, "per-block matrix to weight: gae's or transformer_attribution's"),
    )  # fmt: skip
    needs_gradient = True

    def __init__(self, adapter: Adapter, **options: object) -> None:
        super().__init__(adapter, **options)
        if self.config["base"] == "transformer_attribution":
            adapter.check_lrp("lnstd with base='transformer_attribution'")

    def needs(self) -> Needs:
        n = super().needs()
        if self.config["std"] != "none":
            n.token_std = set(self.blocks)
        if self.config["base"] == "transformer_attribution":
            n.relevance = set(self.blocks)
        return n

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        if self.config["base"] == "transformer_attribution":
            m = self.relevance_attention(view)
        else:
            m = self.gradient_attention(view)
        if self.config["std"] != "none":
            s = view.token_std
            weight = view.wm.to_windows(1.0 / s if self.config["std"] == "inverse" else s)
            # pre-norm scales column j (M · diag(w)); post-norm scales row i (diag(w) · M)
            m = m * weight.unsqueeze(3 if view.ref.std_side == "query" else 2)
        return normalize(m, self.config["normalize"])
