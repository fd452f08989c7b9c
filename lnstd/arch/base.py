"""The adapter interface: what the relevance code needs to know about a timm architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LnstdError, OptionError

__all__ = [
    "Adapter",
    "AttentionParts",
    "BlockRef",
    "CaptureUnavailableError",
    "HeadRef",
    "LRPOperands",
    "LRPRef",
    "MergeRef",
    "UnsupportedModelError",
    "WindowMap",
    "biased_qkv",
    "is_rms_norm",
    "merge_qkv",
    "split_qkv",
    "token_std",
]


class UnsupportedModelError(LnstdError, TypeError):
    """Raised when a model (or a method on it) is not one lnstd knows how to explain."""


class CaptureUnavailableError(UnsupportedModelError, OptionError):
    """``capture="fused"`` asked of a model whose attention cannot be rebuilt exactly from q and k."""


@dataclass(frozen=True)
class LRPRef:
    """The modules of one block that the LRP rules act on. Pre-norm ``x + B1(N1(x)); + B2(N2(x))`` or
    post-norm ``x + N1(B1(x)); + N2(B2(x))``: the rules only need where each tensor is seen.

    Attributes:
        proj: the attention's output projection (Linear); its input is the attention output after
            any output norm (ViT ``scale_norm``, EVA ``scale_attn_inner``).
        mid: the module whose input is the residual stream between the two branches (pre-norm: the
            norm before the MLP; post-norm: the MLP).
        fc1: the MLP's input projection (Linear); None for gated MLPs.
        act: the MLP's elementwise activation.
        fc2: the MLP's output projection (Linear).
        branch1, branch2: the modules whose outputs are the attention and MLP branches exactly as they
            are added to the residual stream (after layer-scale, post-norm and drop-path).
        norms: every normalisation layer inside the block (norm1, q/k norms, attention output norm,
            norm2, MLP norm), Identity placeholders left out.
        gate_inputs: for gated MLPs (SwiGLU), the modules whose whole outputs are the factors of the
            elementwise product (the activation applied to one of them).
        out: the module whose input is the attention output ``A V`` with heads merged, where q, k, v are
            not the output of a module the hooks can reach (``BlockRef.qkv`` is None); AttnLRP then
            applies the uniform rules at ``A V`` and at ``A`` (``BlockRef.attn_drop``).
    """

    proj: nn.Module
    mid: nn.Module
    fc1: nn.Module | None
    act: nn.Module
    fc2: nn.Module
    branch1: nn.Module
    branch2: nn.Module
    norms: tuple[nn.Module, ...]
    gate_inputs: tuple[nn.Module, ...] = ()
    out: nn.Module | None = None


@dataclass
class LRPOperands:
    """What the relevance walk reads of one block's attention where no module hook sees q, k and v
    (``BlockRef.qkv`` is None): recomputed by the adapter from the attention's input.

    Attributes:
        q, k: (B * nW, heads, T, d), the operands of the logit product ``q k^T`` exactly as the model
            forms them (after q/k norms, L2 normalisation and rotary embedding; before the scale).
        v: (B * nW, heads, T, d), the values.
        weight: (3 * heads * d, C), the projection from the attention's input to q, k, v (timm's
            packing: q, k, v, then heads).
        rotation: where a rotary embedding turns ``q_in`` into ``q`` (and ``k_in`` into ``k``): the
            per-token linear map of the last n tokens, (heads or 1, n, d, d),
            ``q[T - n + t] = rotation[t] @ q_in[T - n + t]``; the tokens before them (class and register
            tokens) are not rotated. None where there is no rotation.
        q_in, k_in: q and k before the rotation (after any q/k norm), where there is one.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weight: torch.Tensor
    rotation: torch.Tensor | None = None
    q_in: torch.Tensor | None = None
    k_in: torch.Tensor | None = None


@dataclass(frozen=True)
class HeadRef:
    """What follows the last block: ``logits = fc(pool(tokens))`` with normalisations in between.

    Attributes:
        tokens: the module whose output is the token tensor the head pools (after the final norm).
        fc: the Linear layer that produces the logits.
        norms: the normalisation layers outside the blocks on the way from the patch embedding to
            the logits (pre-norm, final norm, pooled-feature norm), Identity placeholders left out.
        token_heads: where the logits are the mean of two Linear heads that each read one token row
            of ``tokens`` (DeiT: ``fc`` on row 0, the distillation head on row 1): (head, row) pairs;
            empty where ``fc`` reads the readout (``Adapter.readout_start``).
    """

    tokens: nn.Module
    fc: nn.Module
    norms: tuple[nn.Module, ...]
    token_heads: tuple[tuple[nn.Module, int], ...] = ()


@dataclass(frozen=True)
class MergeRef:
    """A patch merging between stages: 2x2 tokens concatenated, normalised, projected by ``reduction``."""

    module: nn.Module
    norm: nn.Module
    reduction: nn.Module


@dataclass(frozen=True)
class BlockRef:
    """One transformer block: the modules the hooks attach to.

    Attributes:
        index: position of the block in the flattened list of all blocks (0 = first).
        stage: stage the block belongs to (always 0 for single-stage models).
        block: the block module (its forward pre-hook records the token layout and starts the
            gradient graph).
        norm1: the LayerNorm whose per-token std ``lnstd`` weights by.
        attn: the attention module.
        attn_drop: the dropout applied to the attention probabilities (its output is ``A`` when
            attention runs unfused).
        std_side: ``"key"`` when ``norm1`` normalises the attention's input (pre-norm: token j is
            divided by ``s_j`` before attention mixes it, so the std weights columns), ``"query"``
            when it normalises the attention's output (post-norm, Swin V2: row i is divided by
            ``s_i`` after mixing, so the std weights rows; Grad-CAM then reads the block's input,
            which is what the attention reads).
        qkv: the linear layer whose output holds q, k, v as (B, T, 3, heads, head_dim), for the
            fused capture; None where that capture does not apply.
        qk_norm: modules whose outputs are q and k after their normalisation (ViT qk-norm; Identity
            modules otherwise), or None to take q, k from ``qkv``.
        out: the module whose input is the attention output ``A V`` as (B, T, heads * head_dim).
        lrp: the modules the LRP rules need, or None where the block is not one they know.
        lrp_problem: why ``lrp`` is None, for the error message ("" where that is the generic reason).
    """

    index: int
    stage: int
    block: nn.Module
    norm1: nn.Module
    attn: nn.Module
    attn_drop: nn.Module
    std_side: str = "key"
    qkv: nn.Module | None = None
    qk_norm: tuple[nn.Module, nn.Module] | None = None
    out: nn.Module | None = None
    lrp: LRPRef | None = None
    lrp_problem: str = ""


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's fused qkv projection output (B, T, 3 * heads * d) -> q, k, v, each (B, heads, T, d)."""
    b, t = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: three (B, heads, T, d) tensors -> (B, T, 3 * heads * d)."""
    b, _, t, _ = q.shape
    return torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(b, t, -1)


def biased_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused q, k, v projection of timm attentions that keep separate q and v biases (BEiT, EVA,
    Swin V2: ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``, k_bias a zero buffer), in float32
    (``.float()``, so a float64 test sees float64), (B, T, 3 * heads * d)."""
    x = x.float()
    if getattr(attn, "q_bias", None) is None:
        bias = attn.qkv.bias
        return torch.nn.functional.linear(x, attn.qkv.weight.float(), None if bias is None else bias.float())
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).float()
    return torch.nn.functional.linear(x, attn.qkv.weight.float(), bias)


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
        """(B, N, ...) token tensor -> (B, nW, T, ...) window layout; padding slots are 0."""
        padded = torch.cat([v, v.new_zeros(v.shape[0], 1, *v.shape[2:])], dim=1)
        return padded[:, self.index]

    def from_windows(self, w: torch.Tensor) -> torch.Tensor:
        """(B, nW, T, ...) window layout -> (B, N, ...) token tensor; padding slots are dropped."""
        rest = w.shape[3:]
        out = w.new_zeros(w.shape[0], self.num_tokens + 1, *rest)
        out[:, self.index.reshape(-1)] = w.reshape(w.shape[0], -1, *rest)
        return out[:, : self.num_tokens]


def is_rms_norm(norm: nn.Module) -> bool:
    """timm's ``RmsNorm`` or torch's ``RMSNorm`` (subclasses included)."""
    from timm.layers import RmsNorm

    return isinstance(norm, (RmsNorm, getattr(nn, "RMSNorm", RmsNorm)))


def token_std(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a LayerNorm divides each token by: ``sqrt(Var_channels(x) + eps)``, biased, float32.

    For an RMSNorm the analogue ``sqrt(mean(x^2) + eps)`` is returned.
    """
    x = x.detach().float()
    eps = float(getattr(norm, "eps", 1e-6) or 1e-6)
    if isinstance(norm, nn.LayerNorm):
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    if is_rms_norm(norm):
        return torch.sqrt(x.pow(2).mean(dim=-1) + eps)
    raise UnsupportedModelError(
        f"token std: norm1 of type {type(norm).__name__} is not a LayerNorm or RMSNorm"
    )


@dataclass
class AttentionParts:
    """What the fused capture keeps of one block's attention: enough to rebuild ``A`` and ``G``.

    ``q``, ``k``, ``v``: (B * nW, heads, T, head_dim) as the kernel saw them (after qk-norm);
    ``mask``: the additive mask the block passed in (Swin's shift mask), if any; ``out``: the
    attention output ``A V`` as (B * nW, T, heads * head_dim), in the graph when gradients are needed.
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    out: torch.Tensor | None = None


class Adapter:
    """Architecture-specific facts, derived from the model (never hard-coded grids).

    Token spaces: every block acts on a token space of ``N_b`` tokens (ViT: prefix + patches;
    Swin: the stage grid, row-major). Readout vectors live on these spaces.
    """

    family: str = ""
    num_prefix: int = 0
    # True where the forward L2-normalises tensors with ``torch.nn.functional.normalize`` outside any
    # module (Swin V2's cosine attention): AttnLRP applies its normalisation rule to those calls.
    lrp_normalize_calls: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks: list[BlockRef] = self._find_blocks()

    # --- structure -------------------------------------------------------------------------
    def _find_blocks(self) -> list[BlockRef]:
        raise NotImplementedError

    def fused_attn_modules(self) -> list[nn.Module]:
        """Attention modules with a ``fused_attn`` flag (switched off for the unfused capture)."""
        return [b.attn for b in self.blocks if hasattr(b.attn, "fused_attn")]

    def checkpointing_modules(self) -> list[nn.Module]:
        """Modules with a ``grad_checkpointing`` flag (recomputation would re-fire hooks)."""
        return []

    def set_input_size(self, hw: tuple[int, int]) -> None:
        """Record the image size of the batch (the grid of dynamic-size models depends on it)."""

    # --- fused attention capture -----------------------------------------------------------------
    def supports_fused_capture(self) -> bool:
        """True when every block's attention can be rebuilt from captured q, k (and bias, mask)."""
        return all(b.qkv is not None and b.out is not None for b in self.blocks)

    def attention_bias(self, block: BlockRef, parts: AttentionParts) -> torch.Tensor | None:
        """The additive term of the attention logits besides ``q k^T * scale`` (broadcastable to
        (B * nW, heads, T, T)): relative position bias and shift mask; None if there is none."""
        return None

    def rebuild_attention(self, block: BlockRef, parts: AttentionParts) -> torch.Tensor:
        """``A = softmax(q k^T * scale + bias)`` in float32, (B * nW, heads, T, T)."""
        q, k = parts.q.float(), parts.k.float()
        logits = (q * float(block.attn.scale)) @ k.transpose(-2, -1)
        bias = self.attention_bias(block, parts)
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1)

    # --- runtime geometry (from captured shapes) ---------------------------------------------
    def window_map(self, block: BlockRef, input_shape: torch.Size, device: torch.device) -> WindowMap:
        """Window layout of ``block`` given the shape of its input."""
        raise NotImplementedError

    def readout_start(self, input_shape: torch.Size, batch: int, device: torch.device) -> torch.Tensor:
        """Readout vector on the last block's token space: class token row(s) or pooled rows."""
        raise NotImplementedError

    def step_down(self, v: torch.Tensor, upper_shape: torch.Size, lower_shape: torch.Size) -> torch.Tensor:
        """Carry ``v`` from one block's token space to the previous block's (merging, if any)."""
        return v

    def to_grid(self, v: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """Token-space vector (B, N) -> patch grid (B, h, w), prefix tokens skipped."""
        raise NotImplementedError

    def patch_features(self, f: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Attention input (norm1 output; post-norm: block input) -> (B, n_patches, C) patch
        features and their grid (for Grad-CAM)."""
        raise NotImplementedError

    # --- LRP (docs/lrp.md) -------------------------------------------------------------------------
    def lrp_head(self) -> HeadRef | None:
        """The head's modules for the LRP rules, or None where the head is not one they know."""
        return None

    def lrp_merges(self) -> dict[int, MergeRef]:
        """Patch mergings, keyed by the index of the block that follows each one."""
        return {}

    def unmerge(self, r: torch.Tensor, fine_shape: torch.Size) -> torch.Tensor:
        """Relevance of a merging's concatenated features (B, h, w, 4C) -> its input tokens (B, N, C)."""
        raise NotImplementedError

    def embedding(self) -> nn.Module:
        """The patch embedding: the LRP token relevance is read at its output."""
        return self.model.patch_embed

    def embedding_grid(self, r: torch.Tensor) -> torch.Tensor:
        """Per-token relevance at the patch embedding output, channels summed -> (B, h, w)."""
        raise NotImplementedError

    def lrp_operands(self, block: BlockRef, x: torch.Tensor, kwargs: dict[str, Any]) -> LRPOperands:
        """q, k, v (and the rotation, if any) of ``block``'s attention, recomputed from its input ``x``
        (B * nW, T, C) and the keyword arguments it was called with; needed where ``block.qkv`` is None."""
        raise UnsupportedModelError(f"{type(self.model).__name__}: no LRP operands for block {block.index}")

    def check_lrp(self, method: str, gated: bool = False) -> None:
        """Raise UnsupportedModelError unless the LRP rules of ``method`` know every layer of the model.

        Args:
            method: the method's name, for the message.
            gated: whether the method has a rule for gated (SwiGLU-style) MLPs.
        """

        def problem() -> str | None:
            if self.lrp_head() is None:
                return "its classifier head is not a Linear layer on pooled tokens"
            for b in self.blocks:
                if b.lrp is None:
                    return f"block {b.index} ({type(b.block).__name__}): " + (
                        b.lrp_problem or "not a pre-norm block with a fused qkv projection and an MLP"
                    )
                if b.lrp.fc1 is None and not gated:
                    return (
                        f"block {b.index} has a gated MLP (act(x W_g) * (x W_x), SwiGLU), for which {method} "
                        "has no rule"
                    )
            return None

        why = problem()
        if why is not None:
            raise UnsupportedModelError(f"{method} cannot explain {type(self.model).__name__}: {why}")

    def describe(self) -> dict[str, Any]:
        """Facts for error messages and manifests."""
        return {"family": self.family, "blocks": len(self.blocks), "prefix_tokens": self.num_prefix}
