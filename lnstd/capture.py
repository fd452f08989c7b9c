"""The hook session: installs an adapter's hooks for one pass and always restores the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch.base import Adapter, token_std

__all__ = ["BlockCapture", "Capture", "capture"]


@dataclass
class BlockCapture:
    """What one block exposed during the forward pass."""

    input_shape: torch.Size | None = None  # shape of the norm1 input: (B, N, C) or (B, H, W, C)
    attention: torch.Tensor | None = None  # A, (B * nW, heads, T, T), in the graph when grads needed
    token_std: torch.Tensor | None = None  # s, (B, N) float32
    features: torch.Tensor | None = None  # norm1 output (Grad-CAM layer)


@dataclass
class Capture:
    """Per-block captures of one pass, indexed like ``adapter.blocks``."""

    blocks: dict[int, BlockCapture] = field(default_factory=dict)


@contextlib.contextmanager
def _restored(model: nn.Module, adapter: Adapter) -> Iterator[None]:
    """Eval mode, frozen parameters, unfused attention; put back exactly as found, whatever happens."""
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    fused = [(m, m.fused_attn) for m in adapter.fused_attn_modules()]
    ckpt = [
        (m, m.grad_checkpointing) for m in adapter.checkpointing_modules() if hasattr(m, "grad_checkpointing")
    ]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in fused:
            m.fused_attn = False
        for m, _ in ckpt:
            m.grad_checkpointing = False
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in fused:
            m.fused_attn = flag
        for m, flag in ckpt:
            m.grad_checkpointing = flag


@contextlib.contextmanager
def capture(
    model: nn.Module,
    adapter: Adapter,
    attention: set[int],
    token_stds: set[int],
    features: set[int],
    grad_from: int | None,
) -> Iterator[Capture]:
    """Capture attention / token stds / norm1 outputs of the given blocks during one forward.

    Args:
        model: the timm model.
        adapter: its adapter.
        attention: indices of blocks whose attention probabilities to keep.
        token_stds: indices of blocks whose LN1 token stds to keep.
        features: indices of blocks whose norm1 output to keep.
        grad_from: index of the first block the backward must reach, or None for no gradients.
            The input of that block is cut from the graph and made to require grad, so the graph
            (and any backward) starts there, and no parameter gets a gradient.
    """
    cap = Capture()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def slot(i: int) -> BlockCapture:
        return cap.blocks.setdefault(i, BlockCapture())

    with _restored(model, adapter):
        try:
            for ref in adapter.blocks:
                i = ref.index

                def pre_norm(_m: nn.Module, args: tuple, i: int = i, norm: nn.Module = ref.norm1):
                    x = args[0]
                    slot(i).input_shape = x.shape
                    if i in token_stds:
                        slot(i).token_std = token_std(norm, x).reshape(x.shape[0], -1)

                handles.append(ref.norm1.register_forward_pre_hook(pre_norm))
                if i in features:

                    def post_norm(_m: nn.Module, _a: tuple, out: torch.Tensor, i: int = i):
                        slot(i).features = out

                    handles.append(ref.norm1.register_forward_hook(post_norm))
                if i in attention:

                    def post_drop(_m: nn.Module, _a: tuple, out: torch.Tensor, i: int = i):
                        slot(i).attention = out

                    handles.append(ref.attn_drop.register_forward_hook(post_drop))
                if grad_from == i:

                    def start_graph(_m: nn.Module, args: tuple):
                        return (args[0].detach().requires_grad_(True), *args[1:])

                    handles.append(ref.block.register_forward_pre_hook(start_graph))
            yield cap
        finally:
            for h in handles:
                h.remove()
