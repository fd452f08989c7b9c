"""Shared base of the attribution methods and the registry the CLI and jobs use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from ..arch.base import Adapter, WindowMap
from ..capture import Capture
from ..relevance import head_mean, mask_padding, readout

__all__ = [
    "ChainMethod",
    "Context",
    "Method",
    "get_method",
    "list_methods",
    "register",
    "resolve_blocks",
]

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available by ``name`` (``explain(method=name)``, CLI, jobs)."""

    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a clear error listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}") from None


def resolve_blocks(blocks: str | int, num_blocks: int) -> list[int]:
    """``"all"`` or k (the last k blocks) -> ascending block indices."""
    if blocks == "all":
        return list(range(num_blocks))
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= num_blocks:
        raise ValueError(f"blocks must be 'all' or an int in 1..{num_blocks}, got {blocks!r}")
    return list(range(num_blocks - blocks, num_blocks))


@dataclass
class Context:
    """Everything a method may read after the shared forward/backward pass."""

    adapter: Adapter
    capture: Capture
    batch: int
    attention_grads: dict[int, torch.Tensor]  # dy/dA per block, (B * nW, heads, T, T)
    feature_grads: dict[int, torch.Tensor]  # dy/d(norm1 output) per block


class Method:
    """One attribution method: declares what it needs from the pass, then computes a heatmap.

    Subclasses set the class flags and override :meth:`compute` (or, for chains,
    :meth:`ChainMethod.block_matrix`).
    """

    name: ClassVar[str] = ""
    needs_gradient: ClassVar[bool] = False
    uses_token_std: ClassVar[bool] = False

    def __init__(self, adapter: Adapter, blocks: str | int | None = None) -> None:
        self.adapter = adapter
        n = len(adapter.blocks)
        self.blocks = resolve_blocks(adapter.default_blocks(self.name) if blocks is None else blocks, n)

    def attention_blocks(self) -> list[int]:
        """Blocks whose attention probabilities this method reads."""
        return self.blocks

    def gradient_blocks(self) -> list[int]:
        """Blocks whose attention gradient this method reads."""
        return self.blocks if self.needs_gradient else []

    def feature_blocks(self) -> list[int]:
        """Blocks whose norm1 output (and its gradient) this method reads."""
        return []

    def compute(self, ctx: Context) -> torch.Tensor:
        """Heatmap (B, h, w), float32."""
        raise NotImplementedError


class ChainMethod(Method):
    """A method defined by a per-block matrix and a chain (METHODS.md table)."""

    residual: ClassVar[bool] = True

    def block_matrix(self, ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        """Per-block operator of block i in window layout, (B, nW, T, T) float32."""
        raise NotImplementedError

    def compute(self, ctx: Context) -> torch.Tensor:
        return readout(
            ctx.adapter,
            ctx.capture,
            self.attention_blocks(),
            lambda i, wm: self.block_matrix(ctx, i, wm),
            self.residual,
        )

    @staticmethod
    def mean_attention(ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        """``mean_h A_b`` (padding masked), float32."""
        return mask_padding(head_mean(ctx.capture.blocks[i].attention, ctx.batch), wm)

    @staticmethod
    def gradient_attention(ctx: Context, i: int, wm: WindowMap) -> torch.Tensor:
        """``Ā_b = mean_h (G_b ⊙ A_b)^+`` (padding masked), float32 (Chefer et al. 2021b)."""
        a = ctx.capture.blocks[i].attention.float()
        g = ctx.attention_grads[i].float()
        return mask_padding(head_mean((g * a).clamp(min=0), ctx.batch), wm)
