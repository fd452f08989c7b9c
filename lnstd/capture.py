"""The hook session: installs an adapter's hooks for one pass, streams each block's attention (and its
gradient) to the caller as soon as it exists, and always restores the model.

Two ways to get the attention probabilities ``A`` and the gradient of the target score with respect
to them, ``G``:

- ``fused``: the model keeps its fused attention kernel (``F.scaled_dot_product_attention``) for the
  forward and the backward pass. The hooks keep q, k, v (and Swin's shift mask) and the attention
  output ``O = A V``; ``A = softmax(q k^T * scale + bias)`` is rebuilt in float32 and
  ``G = dO V^T`` is formed from the gradient of ``O`` when the backward pass reaches the block
  (``dy/dA_ij = sum_d dy/dO_id V_jd``, since ``O = A V``). Each block's data is released as soon as
  the caller has used it, so memory is bounded by one block's ``A``, not all blocks'.
- ``unfused``: timm's unfused attention path is switched on and ``A`` is read at the attention
  dropout's output; ``G`` arrives in a hook on that tensor. Kept as the plain reference.

Both give the same maps (tests check fused == unfused == a float64 reference).

Blocks in ``Needs.relevance`` also get the LRP relevance of their attention (Chefer et al. 2021a,
:class:`lnstd.lrp.AttentionRelevance`), computed in the same backward pass just before the block is
handed on; see docs/lrp.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch.base import Adapter, AttentionParts, BlockRef, WindowMap, split_qkv, token_std
from .choices import CAPTURE_MODES, Capture
from .lrp import AttentionRelevance

__all__ = ["BlockView", "Needs", "Session", "restored"]


@dataclass
class Needs:
    """What a pass must capture, per block index."""

    attention: set[int] = field(default_factory=set)  # A (for chains)
    gradient: set[int] = field(default_factory=set)  # G = dy/dA (always a top range of blocks)
    token_std: set[int] = field(default_factory=set)  # s (LN1 token std)
    features: set[int] = field(default_factory=set)  # attention input and its gradient (Grad-CAM)
    relevance: set[int] = field(default_factory=set)  # LRP relevance of A (a top range of gradient blocks)

    def add(self, other: Needs) -> None:
        """Also capture what ``other`` needs."""
        self.attention |= other.attention
        self.gradient |= other.gradient
        self.token_std |= other.token_std
        self.features |= other.features
        self.relevance |= other.relevance

    @property
    def grad_from(self) -> int | None:
        """The first block the backward pass must reach (None: no backward)."""
        blocks = self.gradient | self.features
        return min(blocks) if blocks else None


class BlockView:
    """One block's captured data, as a method sees it; derived matrices are computed once and shared.

    Attributes:
        index: block index; ``ref``: its modules; ``shape``: shape of the block's input;
        ``wm``: its window map; ``batch``: images in the batch.
    """

    def __init__(
        self,
        adapter: Adapter,
        ref: BlockRef,
        shape: torch.Size,
        batch: int,
        attention: Callable[[], torch.Tensor],
        gradient: torch.Tensor | None,
        std: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        self.adapter = adapter
        self.ref = ref
        self.index = ref.index
        self.shape = shape
        self.batch = batch
        self.wm: WindowMap = adapter.window_map(ref, shape, device)
        self._attention = attention
        self._gradient = gradient
        self.token_std = std
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def attention(self) -> torch.Tensor:
        """``A``, (B * nW, heads, T, T) float32."""
        if "A" not in self.cache:
            self.cache["A"] = self._attention().float()
        return self.cache["A"]

    @property
    def gradient(self) -> torch.Tensor:
        """``G = dy/dA``, (B * nW, heads, T, T) float32."""
        if self._gradient is None:
            raise RuntimeError(f"block {self.index}: no attention gradient was captured")
        return self._gradient.float()

    @property
    def attention_relevance(self) -> torch.Tensor:
        """LRP relevance of ``A`` (Chefer et al. 2021a), (B * nW, heads, T, T) float32."""
        if "attention_relevance" not in self.cache:
            raise RuntimeError(f"block {self.index}: no attention relevance was computed")
        return self.cache["attention_relevance"]

    def shared(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A derived matrix computed once per block for every method that asks for it."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@contextlib.contextmanager
def restored(model: nn.Module, adapter: Adapter, unfused: bool) -> Iterator[None]:
    """Eval mode, frozen parameters, no activation checkpointing (and unfused attention if asked);
    put back exactly as found, whatever happens."""
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
        if unfused:
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


class Session:
    """Hooks for one forward (and backward) pass; use as a context manager.

    After the forward pass, :meth:`backward` runs the one backward pass (if any block needs a
    gradient) and hands every needed block to ``on_block`` in descending block order: blocks with a
    gradient as the backward pass reaches them, the others afterwards. ``features`` and their
    gradients (Grad-CAM) are returned by :meth:`backward`.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, needs: Needs, mode: Capture) -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
        self.model, self.adapter, self.needs, self.mode = model, adapter, needs, mode
        self.shapes: dict[int, torch.Size] = {}
        self.stds: dict[int, torch.Tensor] = {}
        self.features: dict[int, torch.Tensor] = {}
        self.attn: dict[int, torch.Tensor] = {}  # unfused: A per block
        self.parts: dict[int, AttentionParts] = {}  # fused (and relevance blocks): q, k, v, mask, out
        self.batch = 0
        self.walk = AttentionRelevance(adapter, needs.relevance) if needs.relevance else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stack = contextlib.ExitStack()

    # --- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> Session:
        self._stack.enter_context(restored(self.model, self.adapter, unfused=self.mode == "unfused"))
        try:
            for ref in self.adapter.blocks:
                self._install(ref)
            if self.walk is not None:
                self.walk.install(self._hook)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def _install(self, ref: BlockRef) -> None:
        i, needs = ref.index, self.needs
        attention = i in needs.attention or i in needs.gradient

        # Grad-CAM's features are what the block's attention reads: norm1's output where norm1
        # precedes attention, the block's input where it follows it (post-norm: after the last
        # attention has mixed, a class-token head leaves the patch tokens without gradient).
        features_at_input = i in needs.features and ref.std_side == "query"

        def block_pre(_m: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            self.shapes[i] = x.shape
            new = None
            if needs.grad_from == i:  # the graph starts here: no earlier block gets a gradient
                x = x.detach().requires_grad_(True)
                new = (x, *args[1:])
            if features_at_input:
                self.features[i] = x
            return new

        self._hook(ref.block.register_forward_pre_hook(block_pre))
        if i in needs.token_std:

            def norm_pre(_m: nn.Module, args: tuple) -> None:
                self.stds[i] = token_std(ref.norm1, args[0]).reshape(args[0].shape[0], -1)

            self._hook(ref.norm1.register_forward_pre_hook(norm_pre))
        if i in needs.features and not features_at_input:

            def norm_post(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                self.features[i] = out

            self._hook(ref.norm1.register_forward_hook(norm_post))
        if not attention:
            return
        if self.mode == "unfused":

            def drop_post(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                self.attn[i] = out

            self._hook(ref.attn_drop.register_forward_hook(drop_post))
            if i not in needs.relevance or ref.qkv is None:  # the relevance walk reads q, k, v in
                return  # either mode; where no module outputs them, the adapter recomputes them
        parts = self.parts.setdefault(i, AttentionParts())
        heads = int(ref.attn.num_heads)

        def attn_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("mask", kwargs.get("attn_mask"))
            if mask is None and len(args) > 1:
                mask = args[1]
            parts.mask = mask

        def qkv_post(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            parts.q, parts.k, parts.v = split_qkv(out.detach(), heads)

        self._hook(ref.attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        self._hook(ref.qkv.register_forward_hook(qkv_post))
        if ref.qk_norm is not None:
            qn, kn = ref.qk_norm
            self._hook(qn.register_forward_hook(lambda _m, _a, out: setattr(parts, "q", out.detach())))
            self._hook(kn.register_forward_hook(lambda _m, _a, out: setattr(parts, "k", out.detach())))
        if i in needs.gradient and self.mode == "fused":

            def out_pre(_m: nn.Module, args: tuple) -> None:
                parts.out = args[0]

            self._hook(ref.out.register_forward_pre_hook(out_pre))

    # --- after the forward pass --------------------------------------------------------------------
    def _view(self, i: int, gradient: torch.Tensor | None) -> BlockView:
        ref = self.adapter.blocks[i]
        if self.mode == "unfused":
            a = self.attn[i]

            def attention() -> torch.Tensor:
                return a.detach()

            device = a.device
        else:
            parts = self.parts[i]

            def attention() -> torch.Tensor:
                return self.adapter.rebuild_attention(ref, parts)

            device = parts.q.device
        return BlockView(
            self.adapter, ref, self.shapes[i], self.batch, attention, gradient, self.stds.get(i), device
        )

    def _release(self, i: int) -> None:
        self.attn.pop(i, None)
        self.parts.pop(i, None)

    def backward(
        self,
        score: torch.Tensor | None,
        on_block: Callable[[BlockView], None],
        targets: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Run the backward pass from ``score`` (the summed target logits) and stream the blocks.

        ``targets`` (B,) are the classes in ``score``; the relevance walk needs them.

        Returns:
            block index -> gradient of the score with respect to that block's attention input
            (norm1's output, or the block's input in post-norm blocks), for the blocks in
            ``needs.features``.
        """
        needs = self.needs
        grad_blocks = sorted(needs.gradient)
        feature_blocks = sorted(needs.features)
        feature_grads: dict[int, torch.Tensor] = {}
        if self.walk is not None:
            if score is None or targets is None:
                raise RuntimeError("attention relevance needs a score and its targets")
            self.walk.start(targets)
        if score is not None and (grad_blocks or feature_blocks):
            handles = []
            inputs: list[torch.Tensor] = []
            for i in grad_blocks:
                if self.mode == "unfused":
                    target = self.attn[i]

                    def on_grad(g: torch.Tensor, i: int = i) -> None:
                        self._hand_on(self._view(i, g), on_block)

                else:
                    parts = self.parts[i]
                    target = parts.out

                    def on_grad(g: torch.Tensor, i: int = i, parts: AttentionParts = parts) -> None:
                        # dy/dA = dO V^T, per head: O (B*, T, heads*d) -> (B*, heads, T, d)
                        b, t, _ = g.shape
                        d_out = g.float().reshape(b, t, parts.v.shape[1], -1).transpose(1, 2)
                        grad = d_out @ parts.v.float().transpose(-2, -1)
                        self._hand_on(self._view(i, grad), on_block)

                if target is None or not target.requires_grad:
                    raise RuntimeError(f"block {i}: the attention output is not in the autograd graph")
                handles.append(target.register_hook(on_grad))
                inputs.append(target)
            inputs += [self.features[i] for i in feature_blocks]
            try:
                grads = torch.autograd.grad(score, inputs)
            finally:
                for h in handles:
                    h.remove()
            feature_grads = dict(zip(feature_blocks, grads[len(grad_blocks) :], strict=True))
        rest = (needs.attention - needs.gradient) if score is not None else needs.attention | needs.gradient
        for i in sorted(rest, reverse=True):
            self._hand_on(self._view(i, None), on_block)
        return feature_grads

    def _hand_on(self, view: BlockView, on_block: Callable[[BlockView], None]) -> None:
        if self.walk is not None and view.index in self.needs.relevance:
            self.walk.step(view, self.parts.get(view.index))
        on_block(view)
        self._release(view.index)
