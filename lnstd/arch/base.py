"""The adapter interface: what the relevance code needs to know about a timm architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Adapter", "BlockRef", "UnsupportedModelError", "WindowMap", "token_std"]


class UnsupportedModelError(TypeError):
    """Raised when a model is not a timm ViT or Swin that lnstd knows how to explain."""


@dataclass(frozen=True)
class BlockRef:
    """One transformer block: the modules the hooks attach to.

    Attributes:
        index: position of the block in the flattened list of all blocks (0 = first).
        stage: stage the block belongs to (always 0 for ViT).
        block: the block module (its forward pre-hook starts the gradient graph).
        norm1: the LayerNorm in front of attention (its input gives the token stds).
        attn: the attention module (carries the ``fused_attn`` switch).
        attn_drop: the dropout applied to the attention probabilities (its output is ``A``).
    """

    index: int
    stage: int
    block: nn.Module
    norm1: nn.Module
    attn: nn.Module
    attn_drop: nn.Module


@dataclass
class WindowMap:
    """Where each attention slot of a block sits on the block's token space.

    ``index[w, t]`` is the token (0..num_tokens-1) held by slot t of window w, or ``num_tokens``
    for a padding slot. A ViT block is one window over all tokens; a Swin block has one window
    per (shifted) local window of its stage grid.
    """

    index: torch.Tensor  # (nW, T) long
    num_tokens: int
    valid: torch.Tensor = field(init=False)  # (nW, T) bool

    def __post_init__(self) -> None:
        self.valid = self.index < self.num_tokens

    @property
    def num_windows(self) -> int:
        return self.index.shape[0]

    @property
    def window_tokens(self) -> int:
        return self.index.shape[1]

    def to_windows(self, v: torch.Tensor) -> torch.Tensor:
        """(B, N) token vector -> (B, nW, T) window layout; padding slots are 0."""
        padded = torch.nn.functional.pad(v, (0, 1))
        return padded[:, self.index]

    def from_windows(self, w: torch.Tensor) -> torch.Tensor:
        """(B, nW, T) window layout -> (B, N) token vector; padding slots are dropped."""
        out = w.new_zeros(w.shape[0], self.num_tokens + 1)
        out[:, self.index.reshape(-1)] = w.reshape(w.shape[0], -1)
        return out[:, : self.num_tokens]


def token_std(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a LayerNorm divides each token by: ``sqrt(Var_channels(x) + eps)``, biased, float32.

    For an RMSNorm the analogue ``sqrt(mean(x^2) + eps)`` is returned.
    """
    x = x.detach().float()
    eps = float(getattr(norm, "eps", 1e-6))
    if isinstance(norm, nn.LayerNorm):
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    if type(norm).__name__ in ("RmsNorm", "RMSNorm"):
        return torch.sqrt(x.pow(2).mean(dim=-1) + eps)
    raise UnsupportedModelError(
        f"token std: norm1 of type {type(norm).__name__} is not a LayerNorm or RMSNorm"
    )


class Adapter:
    """Architecture-specific facts, derived from the model (never hard-coded grids).

    Token spaces: every block acts on a token space of ``N_b`` tokens (ViT: prefix + patches;
    Swin: the stage grid, row-major). Readout vectors live on these spaces.
    """

    family: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks: list[BlockRef] = self._find_blocks()

    # --- structure -------------------------------------------------------------------------
    def _find_blocks(self) -> list[BlockRef]:
        raise NotImplementedError

    def fused_attn_modules(self) -> list[nn.Module]:
        """Attention modules whose ``fused_attn`` flag must be off to expose ``A``."""
        return [b.attn for b in self.blocks]

    def checkpointing_modules(self) -> list[nn.Module]:
        """Modules with a ``grad_checkpointing`` flag (recomputation would re-fire hooks)."""
        return []

    def default_blocks(self, method: str) -> str | int:
        """The ``blocks`` default for a method on this family (METHODS.md, "Which blocks")."""
        return "all"

    # --- runtime geometry (from captured shapes) ---------------------------------------------
    def window_map(self, block: BlockRef, input_shape: torch.Size, device: torch.device) -> WindowMap:
        """Window layout of ``block`` given the shape of its norm1 input."""
        raise NotImplementedError

    def readout_start(self, input_shape: torch.Size, batch: int, device: torch.device) -> torch.Tensor:
        """Readout vector on the last block's token space: class token row or pooled rows."""
        raise NotImplementedError

    def step_down(self, v: torch.Tensor, upper_shape: torch.Size, lower_shape: torch.Size) -> torch.Tensor:
        """Carry ``v`` from one block's token space to the previous block's (merging, if any)."""
        return v

    def to_grid(self, v: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """Token-space vector (B, N) -> patch grid (B, h, w), prefix tokens skipped."""
        raise NotImplementedError

    def patch_features(self, f: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """norm1 output -> (B, n_patches, C) patch features and their grid (for Grad-CAM)."""
        raise NotImplementedError
