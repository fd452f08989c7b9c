"""Layer-wise relevance propagation through timm Vision Transformers (docs/lrp.md).

- :class:`AttentionRelevance`: the rules of Chefer, Gur & Wolf (CVPR 2021), applied explicitly and
  top-down to activations captured in the forward pass; it yields the relevance of each block's
  attention probabilities, which ``transformer_attribution`` weights by the attention gradient.
- :class:`ModifiedGradients`: AttnLRP (Achtibat et al., ICML 2024) as one backward pass. Every rule is
  written as gradient x input; forward hooks keep each output and swap the gradient of the layers
  where the rule differs from the plain gradient (normalisations, activations, q/k/v or A V and A,
  gated products), and ``F.normalize`` calls inside a module (Swin V2) get the norm rule through a
  ``TorchFunctionMode`` for the duration of the pass.

Both work on whole batches: every sum a rule takes runs over one image, never over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .arch.base import (
    Adapter,
    AttentionParts,
    LRPOperands,
    UnsupportedModelError,
    is_rms_norm,
    merge_qkv,
    split_qkv,
    token_std,
)

if TYPE_CHECKING:
    from .capture import BlockView

__all__ = [
    "AttentionRelevance",
    "ModifiedGradients",
    "add_relevance",
    "bilinear_relevance",
    "clone_relevance",
    "linear_relevance",
    "pool_relevance",
    "rotation_relevance",
    "safe_divide",
]

Register = Callable[[RemovableHandle], None]

# --- Chefer et al. 2021a: rules (modules/layers_ours.py), batched with per-image sums -------------------

STABILIZER = 1e-9  # layers_ours.safe_divide


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, and 0 where ``b == 0``: the authors' ``safe_divide``, kept exactly."""
    den = b + STABILIZER
    den = den + (den == 0).to(den.dtype) * STABILIZER
    return a / den * (b != 0).to(a.dtype)


def linear_relevance(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``Linear.relprop`` with alpha = 1, beta = 0 (what ``generate_LRP`` passes): only the positive
    contributions ``x_i w_ji > 0`` share ``R_j``; the bias takes no part."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(r, xp @ wp.T + xn @ wn.T)
    return xp * (s @ wp) + xn * (s @ wn)


def rotation_relevance(x: torch.Tensor, m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """:func:`linear_relevance` (alpha = 1) of a per-token linear map without bias, ``y_t = m_t x_t``
    (a rotary embedding): x and r (B, heads, n, d), m (heads or 1, n, d_out, d_in)."""
    eq = "tji,bhti->bhtj" if m.shape[0] == 1 else "htji,bhti->bhtj"
    mt = m[0] if m.shape[0] == 1 else m  # einsum batches over tokens: no (B, heads, n, d, d) copy of m
    mp, mn = mt.clamp(min=0), mt.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(r, torch.einsum(eq, mp, xp) + torch.einsum(eq, mn, xn))
    back = eq.replace("bhti->bhtj", "bhtj->bhti")
    return xp * torch.einsum(back, mp, s) + xn * torch.einsum(back, mn, s)


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(1, t.ndim)), keepdim=True)


def add_relevance(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Add.relprop``: ``R`` shared in proportion to ``a`` and ``b``, then each part rescaled so the
    two totals split ``sum R`` as ``|sum R_a| : |sum R_b|``; sums per image (the authors' code sums
    over the whole batch, which is the same thing for their batches of one)."""
    s = safe_divide(r, a + b)
    ra, rb = a * s, b * s
    sa, sb, total = _per_image(ra), _per_image(rb), _per_image(r)
    both = sa.abs() + sb.abs()
    ra = ra * safe_divide(safe_divide(sa.abs(), both) * total, sa)
    rb = rb * safe_divide(safe_divide(sb.abs(), both) * total, sb)
    return ra, rb


def clone_relevance(x: torch.Tensor, *rs: torch.Tensor) -> torch.Tensor:
    """``Clone.relprop``: ``x * sum_k R_k / x`` (the relevances of the copies add up)."""
    return x * sum(safe_divide(r, x) for r in rs)


def bilinear_relevance(
    a: torch.Tensor, b: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``einsum.relprop`` on ``Z = a @ b`` then both halves divided by 2 (``Attention.relprop``)."""
    s = safe_divide(r, a @ b)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def pool_relevance(tokens: torch.Tensor, weights: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``RelPropSimple`` of the head's pooling ``z = sum_j w_j x_j / sum_j w_j`` (class token:
    ``IndexSelect``; mean of tokens: ``AdaptiveAvgPool``): ``R_jc = x_jc (w_j / sum w) R_c / z_c``.

    Args:
        tokens: (B, N, C); weights: (B, N), the rows the head reads; r: (B, C) at the pooled features.
    """
    w = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)
    z = (tokens * w).sum(dim=1)
    return tokens * w * safe_divide(r, z).unsqueeze(1)


class AttentionRelevance:
    """Chefer et al.'s relevance ``R_A`` of each block's attention probabilities, block by block.

    :meth:`install` captures, in the forward pass, what the rules read (the blocks from the lowest one
    asked for upwards, the head, the mergings in between). :meth:`start` sends the one-hot target
    through the head; :meth:`step` must then see every block from the last down to the lowest, in
    that order: it stores ``R_A`` (B * nW, heads, T, T) in the block's view as
    ``"attention_relevance"``, carries the relevance to the block's input and keeps the part of it on
    the patch tokens, per image, in :attr:`patch_totals` (``transformer_attribution``'s completeness).
    """

    def __init__(self, adapter: Adapter, blocks: set[int]) -> None:
        head = adapter.lrp_head()
        if head is None:
            raise RuntimeError("the adapter has no LRP head (check_lrp was not called)")
        self.adapter, self.head, self.lowest = adapter, head, min(blocks)
        self.merges = {i: m for i, m in adapter.lrp_merges().items() if i > self.lowest}
        self.saved: dict[int, dict[str, Any]] = {}
        self.r: torch.Tensor | None = None  # (B, N, C) at the output of the next block down
        # block -> (B,) relevance reaching the patch tokens of its input (prefix tokens left out)
        self.patch_totals: dict[int, torch.Tensor] = {}

    def install(self, register: Register) -> None:
        """Register the capture hooks (``register`` keeps the handles for removal)."""

        def keep(store: dict[str, Any], key: str, output: bool = False) -> Callable[..., None]:
            if output:
                return lambda _m, _a, out: store.__setitem__(key, out.detach())
            return lambda _m, args: store.__setitem__(key, args[0].detach())

        def keep_call(store: dict[str, Any]) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                store["attn_in"], store["attn_kwargs"] = args[0].detach(), kwargs

            return hook

        for ref in self.adapter.blocks[self.lowest :]:
            s, lrp = self.saved.setdefault(ref.index, {}), ref.lrp
            assert lrp is not None and lrp.fc1 is not None
            register(ref.block.register_forward_pre_hook(keep(s, "x")))
            register(ref.attn.register_forward_pre_hook(keep_call(s), with_kwargs=True))  # = qkv input
            register(lrp.proj.register_forward_pre_hook(keep(s, "proj_in")))
            register(lrp.branch1.register_forward_hook(keep(s, "branch1", output=True)))
            register(lrp.mid.register_forward_pre_hook(keep(s, "mid")))
            register(lrp.fc1.register_forward_pre_hook(keep(s, "fc1_in")))
            register(lrp.fc2.register_forward_pre_hook(keep(s, "fc2_in")))
            register(lrp.branch2.register_forward_hook(keep(s, "branch2", output=True)))
        for i, m in self.merges.items():
            s = self.saved[i]
            register(
                m.module.register_forward_pre_hook(lambda _m, args, s=s: s.__setitem__("fine", args[0].shape))
            )
            register(m.reduction.register_forward_pre_hook(keep(s, "reduction_in")))
        s = self.saved.setdefault(-1, {})
        register(self.head.tokens.register_forward_hook(keep(s, "tokens", output=True)))
        if not self.head.token_heads:
            register(self.head.fc.register_forward_pre_hook(keep(s, "features")))
        for k, (fc, _row) in enumerate(self.head.token_heads):
            register(fc.register_forward_pre_hook(keep(s, f"features{k}")))
            register(fc.register_forward_hook(keep(s, f"logits{k}", output=True)))

    def start(self, targets: torch.Tensor) -> None:
        """Relevance at the last block's output for a one-hot target (the authors start from 1)."""
        s = self.saved.pop(-1)
        tokens = s["tokens"]
        batch = tokens.shape[0]
        flat = tokens.float().reshape(batch, -1, tokens.shape[-1])
        onehot = F.one_hot(targets, self.head.fc.out_features).float()
        if not self.head.token_heads:
            r = linear_relevance(s["features"].float(), self.head.fc.weight.float(), onehot)  # head drop,
            weights = self.adapter.readout_start(tokens.shape, batch, tokens.device)  # fc_norm: identity
            self.r = pool_relevance(flat, weights, r)  # final norm: identity
            return
        # Two heads on two token rows, their logits averaged (DeiT): the sum is Add.relprop, the 1/2 a
        # constant factor (identity); then each head's Linear and its token row (IndexSelect).
        if len(self.head.token_heads) != 2:
            raise RuntimeError("the relevance start knows the mean of two token heads")
        r_logits = add_relevance(s["logits0"].float(), s["logits1"].float(), onehot)
        self.r = torch.zeros_like(flat)
        for k, ((fc, row), r_k) in enumerate(zip(self.head.token_heads, r_logits, strict=True)):
            r_feat = linear_relevance(s[f"features{k}"].float(), fc.weight.float(), r_k)
            weights = torch.zeros(flat.shape[:2], device=flat.device)
            weights[:, row] = 1.0
            self.r = self.r + pool_relevance(flat, weights, r_feat)

    def step(self, view: BlockView, parts: AttentionParts | None) -> None:
        """Block ``view.index``: store ``R_A`` in ``view.cache`` and carry the relevance below it.

        ``parts``: q, k, v as the capture's hooks saw them at the qkv projection's output, where it has
        one (``BlockRef.qkv``); otherwise the adapter recomputes them from the attention's input.
        """
        i, wm, batch = view.index, view.wm, view.batch
        s, lrp, r = self.saved.pop(i), view.ref.lrp, self.r
        if r is None or lrp is None or lrp.fc1 is None:
            raise RuntimeError(f"block {i}: the relevance walk is not at this block")
        if view.ref.qkv is not None and parts is not None:
            ops = LRPOperands(parts.q, parts.k, parts.v, view.ref.qkv.weight)
        else:
            ops = self.adapter.lrp_operands(view.ref, s["attn_in"], s["attn_kwargs"])

        def flat(t: torch.Tensor) -> torch.Tensor:  # Swin keeps (B, H, W, C) between some layers
            return t.float().reshape(batch, -1, t.shape[-1])

        x, mid = flat(s["x"]), flat(s["mid"])
        # MLP branch: drop-path, layer-scale, dropouts, the MLP's norm, the activation and norm2
        # (before the MLP, or after it in post-norm blocks) all pass relevance unchanged (the
        # authors' identity rules for GELU, Dropout, LayerNorm; RelPropSimple for a constant factor).
        r_mid, r_mlp = add_relevance(mid, flat(s["branch2"]), r)
        r_hidden = linear_relevance(flat(s["fc2_in"]), lrp.fc2.weight.float(), r_mlp)
        r_norm2 = linear_relevance(flat(s["fc1_in"]), lrp.fc1.weight.float(), r_hidden)
        r_mid = clone_relevance(mid, r_mid, r_norm2)
        # attention branch, in window layout (Swin's roll, pad and partition only move tokens)
        r_x, r_attn = add_relevance(x, flat(s["branch1"]), r_mid)
        t = wm.window_tokens
        r_proj = wm.to_windows(r_attn).reshape(-1, t, r_attn.shape[-1])
        r_out = linear_relevance(s["proj_in"].float(), lrp.proj.weight.float(), r_proj)
        v = ops.v.float()
        r_out = r_out.reshape(r_out.shape[0], t, v.shape[1], -1).transpose(1, 2)
        r_a, r_v = bilinear_relevance(view.attention, v, r_out)
        view.cache["attention_relevance"] = r_a
        # softmax and attention dropout: identity; the scale and the logits' bias/mask are constants;
        # q/k norms and the L2 normalisation of cosine attention: identity; a rotary embedding: Linear
        r_q, r_kt = bilinear_relevance(ops.q.float(), ops.k.float().transpose(-2, -1), r_a)
        r_k = r_kt.transpose(-2, -1)
        if ops.rotation is not None:  # the last n tokens only; the prefix tokens pass unchanged
            assert ops.q_in is not None and ops.k_in is not None
            rotation, n = ops.rotation.float(), ops.rotation.shape[-3]
            r_q, r_k = r_q.clone(), r_k.clone()
            r_q[..., -n:, :] = rotation_relevance(ops.q_in[..., -n:, :].float(), rotation, r_q[..., -n:, :])
            r_k[..., -n:, :] = rotation_relevance(ops.k_in[..., -n:, :].float(), rotation, r_k[..., -n:, :])
        r_qkv = merge_qkv(r_q, r_k, r_v)
        r_in = linear_relevance(s["attn_in"].float(), ops.weight.float(), r_qkv)
        r_norm1 = wm.from_windows(r_in.reshape(batch, wm.num_windows, t, -1))  # norm1: identity
        r = clone_relevance(x, r_x, r_norm1)
        self.patch_totals[i] = self.adapter.to_grid(r.sum(dim=-1), view.shape).sum(dim=(1, 2))
        if i == self.lowest:
            self.r = None
            return
        if i in self.merges:  # patch merging: reduction Linear, norm (identity), 2x2 layout undone
            m = self.merges[i]
            red = s["reduction_in"].float()
            r = linear_relevance(red, m.reduction.weight.float(), r.reshape(*red.shape[:-1], -1))
            r = self.adapter.unmerge(r, s["fine"])
        self.r = r


# --- AttnLRP (Achtibat et al. 2024) as gradient x input ------------------------------------------------


class _Swap(torch.autograd.Function):
    """Forward: the module's own output ``y``; backward: ``rule(grad)`` to ``source`` (the module's
    input, or its output when the rule only rescales the gradient arriving there)."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, y: torch.Tensor, rule: Callable) -> torch.Tensor:
        ctx.rule = rule
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.rule(grad), None, None


def _norm_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """LayerNorm / RMSNorm with the std held constant (identity rule on ``1/std``, epsilon rule on the
    centring and the affine map): the gradient of that linear map."""
    std = token_std(module, x).unsqueeze(-1)
    weight = None if getattr(module, "weight", None) is None else module.weight.float()
    center = isinstance(module, nn.LayerNorm)

    def rule(g: torch.Tensor) -> torch.Tensor:
        g = g.float() if weight is None else g.float() * weight
        if center:
            g = g - g.mean(dim=-1, keepdim=True)
        return (g / std).to(x.dtype)

    return rule


def _check_norm(module: nn.Module) -> None:
    channel_norm = isinstance(module, nn.LayerNorm) or is_rms_norm(module)
    if not channel_norm or len(tuple(getattr(module, "normalized_shape", ()))) != 1:
        raise UnsupportedModelError(
            f"attnlrp has no rule for {type(module).__name__}: it knows LayerNorm and RMSNorm over channels"
        )


def _identity_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """Elementwise activation: relevance passes unchanged, so the gradient is scaled by ``y / x``."""
    ratio = _safe_ratio(y.float(), x.float())
    return lambda g: (g.float() * ratio).to(x.dtype)


def _safe_ratio(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y / x``, 0 where ``x == 0`` (no relevance sits on a zero input)."""
    return torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))


def _halve_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """A factor of an elementwise product: uniform rule, half of the product's relevance."""
    return lambda g: g / 2


def _qkv_rule(heads: int) -> Callable:
    """q, k, v from the fused projection: uniform rule on ``A V`` (v gets half) and on ``q k^T`` (q and
    k get half of A's half; A itself is never touched, so fused attention kernels can stay)."""

    def make(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
        def rule(g: torch.Tensor) -> torch.Tensor:
            q, k, v = split_qkv(g, heads)
            return merge_qkv(q / 4, k / 4, v / 2)

        return rule

    return make


def _halve_input(_m: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: half of the gradient reaching the module's input goes on (uniform rule on the
    product ``A V`` that the input is: both ``A`` and ``V`` get half)."""
    x = args[0]
    if not x.requires_grad:
        return None
    return (_Swap.apply(x, x.detach(), lambda g: g / 2), *args[1:])


def _held_normalize(
    input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.normalize`` with the norm held constant: the same value, the gradient of ``x / const``."""
    if out is not None:
        raise UnsupportedModelError("attnlrp: F.normalize(..., out=...) inside the model is not supported")
    denom = input.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(input)
    return input / denom.detach()


class _HeldNormalize(TorchFunctionMode):
    """AttnLRP's normalisation rule (identity rule on the division by the norm, Prop. 3.4) for the
    ``F.normalize`` calls no module hook reaches (Swin V2's cosine attention)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.normalize:
            return _held_normalize(*args, **kwargs)
        return func(*args, **kwargs)


class ModifiedGradients:
    """AttnLRP's rules as forward hooks; use as a context manager around one forward and backward pass.

    Inside, the model computes its usual outputs; the gradient of the target logit with respect to
    :attr:`tokens` (the patch embedding's output, a leaf) times :attr:`tokens` is then the AttnLRP
    relevance. Every other layer (linear maps, residual additions, layer-scale, pooling, Swin's window
    moves, softmax, rotary embeddings, biases) already has the rule's gradient: see docs/lrp.md. Hooks
    are removed on exit.

    Where a block's q, k, v are not a module's output (``BlockRef.qkv`` is None: BEiT, EVA, Swin V2) the
    uniform rules act at ``A V`` and at ``A`` instead, which needs the unfused attention path:
    :attr:`unfused` says so, and the caller switches it on (``capture.restored``).
    """

    def __init__(self, adapter: Adapter) -> None:
        adapter.check_lrp("attnlrp", gated=True)
        self.adapter = adapter
        self.unfused = any(ref.qkv is None for ref in adapter.blocks)
        self.rules, self.input_rules = self._rules()
        for module, make, _ in self.rules:
            if make is _norm_rule:
                _check_norm(module)
        self.tokens: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._mode: _HeldNormalize | None = None

    def _rules(self) -> tuple[list[tuple[nn.Module, Callable, bool]], list[nn.Module]]:
        """(module, rule maker, whether the rule acts on the output's gradient rather than replacing
        the module's own gradient), and the modules whose input gradient is halved."""
        head = self.adapter.lrp_head()
        assert head is not None
        rules: list[tuple[nn.Module, Callable, bool]] = [(m, _norm_rule, False) for m in head.norms]
        halve_inputs: list[nn.Module] = []
        for ref in self.adapter.blocks:
            lrp = ref.lrp
            assert lrp is not None
            rules += [(m, _norm_rule, False) for m in lrp.norms]
            rules.append((lrp.act, _identity_rule, False))
            if ref.qkv is not None:
                rules.append((ref.qkv, _qkv_rule(int(ref.attn.num_heads)), True))
            else:
                # A V: half to A and to V (at the product's output); q k^T: half to q and to k (at A,
                # through the softmax, whose rule is its plain gradient): q, k 1/4, v 1/2 in all
                assert lrp.out is not None
                halve_inputs.append(lrp.out)
                rules.append((ref.attn_drop, _halve_rule, True))
            rules += [(m, _halve_rule, True) for m in lrp.gate_inputs]
        return rules, halve_inputs

    def __enter__(self) -> ModifiedGradients:
        try:
            for module, make, on_output in self.rules:

                def hook(
                    m: nn.Module,
                    args: tuple,
                    out: torch.Tensor,
                    make: Callable = make,
                    on_output: bool = on_output,
                ) -> Any:
                    # the rule's gradient either replaces the module's (x -> out) or rescales the
                    # gradient reaching the output, which then flows through the module as usual
                    source = out if on_output else args[0]
                    if not source.requires_grad:
                        return None
                    return _Swap.apply(source, out.detach(), make(m, args[0], out))

                self._handles.append(module.register_forward_hook(hook))
            for module in self.input_rules:
                self._handles.append(module.register_forward_pre_hook(_halve_input))
            self._handles.append(self.adapter.embedding().register_forward_hook(self._leaf))
            if self.adapter.lrp_normalize_calls:
                self._mode = _HeldNormalize()
                self._mode.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _leaf(self, _m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
        self.tokens = out.detach().requires_grad_(True)
        return self.tokens

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
