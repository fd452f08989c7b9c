"""Chain arithmetic on token-to-token operators: window-layout matrices and the readout vector.

Every per-block operator is kept in window layout, (B, nW, T, T): a ViT block is a single window of
all N tokens, a Swin block has one window per (shifted) local window. The dense N x N matrix never
exists; only the readout vector ``v`` (one row, or the column sums, of R) is carried, top-down:
``v <- v + v M_b`` (residual chains) or ``v <- v M_b`` (rollout, raw attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .arch.base import Adapter, WindowMap
from .capture import Capture

__all__ = [
    "apply",
    "head_mean",
    "mask_padding",
    "normalize",
    "readout",
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


def readout(
    adapter: Adapter,
    cap: Capture,
    blocks: Sequence[int],
    matrix: Callable[[int, WindowMap], torch.Tensor],
    residual: bool,
) -> torch.Tensor:
    """Heatmap (B, h, w) of the chain over ``blocks`` (the last k blocks, ascending).

    Args:
        adapter: architecture adapter (token spaces, merging, readout rows).
        cap: captures of the pass (input shapes per block).
        blocks: contiguous block indices ending at the last block.
        matrix: block index and its window map -> per-block operator (B, nW, T, T), float32.
        residual: ``v <- v + v M`` (R_b = R_{b-1} + M_b R_{b-1}) if True, else ``v <- v M``.
    """
    v: torch.Tensor | None = None
    upper: torch.Size | None = None
    for i in reversed(blocks):
        shape = cap.blocks[i].input_shape
        attn = cap.blocks[i].attention
        device = attn.device if attn is not None else None
        wm = adapter.window_map(adapter.blocks[i], shape, device)
        m = matrix(i, wm)
        if v is None:
            v = adapter.readout_start(shape, m.shape[0], m.device)
        else:
            v = adapter.step_down(v, upper, shape)
        vm = apply(v, m, wm)
        v = v + vm if residual else vm
        upper = shape
    if v is None or upper is None:
        raise ValueError("readout needs at least one block")
    return adapter.to_grid(v, upper)
