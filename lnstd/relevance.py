"""Chain arithmetic on token-to-token operators: window-layout matrices and the readout vector.

Every per-block operator is kept in window layout, (B, nW, T, T): a ViT block is a single window of
all N tokens, a Swin block has one window per (shifted) local window. The dense N x N matrix never
exists; only the readout vector ``v`` (one row, or the column sums, of R) is carried, top-down:
``v <- v + v M_b`` (residual chains, whose identity part is carried apart from the rest) or
``v <- v M_b`` (rollout, raw attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .arch.base import Adapter, WindowMap

if TYPE_CHECKING:
    from .capture import BlockView


class ChainLike(Protocol):
    blocks: list[int]
    residual: bool

    def block_matrix(self, view: BlockView) -> torch.Tensor: ...


__all__ = [
    "ChainRunner",
    "apply",
    "head_mean",
    "mask_padding",
    "normalize",
    "rownorm_with_identity",
    "safe_div",
]


def head_mean(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * nW, heads, T, T) -> float32 mean over heads, (B, nW, T, T)."""
    bw, _, t, _ = x.shape
    return x.float().mean(dim=1).view(batch, bw // batch, t, t)


def mask_padding(m: torch.Tensor, wm: WindowMap) -> torch.Tensor:
    """Zero the rows and columns of padding slots (they are not tokens of the grid)."""
    if bool(wm.valid.all()):
        return m
    valid = wm.valid.to(m.dtype)
    return m * valid[None, :, :, None] * valid[None, :, None, :]


def safe_div(m: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``m / denom`` where ``denom`` is non-zero; zero sums (all-zero matrices or rows) stay zero."""
    return m / torch.where(denom != 0, denom, torch.ones_like(denom))


def normalize(m: torch.Tensor, how: str) -> torch.Tensor:
    """``matrix``: each image's whole matrix sums to one; ``row``: each row does; ``none``."""
    if how == "matrix":
        return safe_div(m, m.sum(dim=(1, 2, 3), keepdim=True))
    if how == "row":
        return safe_div(m, m.sum(dim=-1, keepdim=True))
    return m


def rownorm_with_identity(m: torch.Tensor, wm: WindowMap) -> torch.Tensor:
    """``rownorm(I + m)`` over the real tokens of each window (rollout's per-block matrix)."""
    eye = torch.diag_embed(wm.valid.to(m.dtype)).unsqueeze(0)
    return normalize(m + eye, "row")


def apply(v: torch.Tensor, m: torch.Tensor, wm: WindowMap) -> torch.Tensor:
    """``v M`` for a token vector v (B, N) and a window-layout operator M (B, nW, T, T)."""
    vw = wm.to_windows(v)
    return wm.from_windows(torch.einsum("bwi,bwij->bwj", vw, m))


class ChainRunner:
    """Carries every chain method's readout vector down the blocks as the blocks arrive.

    Blocks must be fed in descending order (the order the backward pass visits them); each method
    reads only the blocks it selected (the last k, contiguous). ``v <- v M_b`` for chains without
    the identity (rollout, raw attention). Residual chains (``R_b = R_{b-1} + M_b R_{b-1}``, so
    ``v <- v + v M_b``) carry the readout of the identity, ``v0`` (the start vector, moved down
    through the mergings), and the off-identity part ``d`` separately: ``d <- d + (v0 + d) M_b``,
    and the map is read from ``d``. For pooled models ``v0`` is a constant on the patch tokens that
    can be orders of magnitude above ``d``; summed in float32 it would round ``d`` away.
    """

    def __init__(self, adapter: Adapter, methods: dict[str, ChainLike]) -> None:
        self.adapter = adapter
        self.methods = methods
        self._v: dict[str, torch.Tensor] = {}  # v (no identity) or d (residual)
        self._v0: dict[str, torch.Tensor] = {}  # residual chains: the identity's readout
        self._shape: dict[str, torch.Size] = {}

    def feed(self, view: BlockView) -> None:
        """Apply block ``view.index`` to every method that selected it."""
        for name, m in self.methods.items():
            if view.index not in m.blocks:
                continue
            mat = m.block_matrix(view)
            if name not in self._v:
                if view.index != m.blocks[-1]:
                    raise RuntimeError(f"{name}: block {view.index} arrived before the last block")
                v = self.adapter.readout_start(view.shape, mat.shape[0], mat.device)
                if m.residual:
                    v0, v = v, torch.zeros_like(v)
            else:
                v = self.adapter.step_down(self._v[name], self._shape[name], view.shape)
                if m.residual:
                    v0 = self.adapter.step_down(self._v0[name], self._shape[name], view.shape)
            if m.residual:
                self._v[name] = v + apply(v0 + v, mat, view.wm)
                self._v0[name] = v0
            else:
                self._v[name] = apply(v, mat, view.wm)
            self._shape[name] = view.shape

    def heatmap(self, name: str) -> torch.Tensor:
        """The (B, h, w) map of method ``name`` once all its blocks were fed (residual chains: the
        off-identity part, docs/methods.md "Readout")."""
        if name not in self._v:
            raise RuntimeError(f"{name}: no block was fed")
        return self.adapter.to_grid(self._v[name], self._shape[name])
