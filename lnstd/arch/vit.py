"""Adapter for timm ``VisionTransformer`` (class token or avg pool, registers, qk-norm, layer-scale)."""

from __future__ import annotations

import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn

from .base import Adapter, BlockRef, HeadRef, LRPRef, UnsupportedModelError, WindowMap

__all__ = ["ViTAdapter", "lrp_block", "lrp_fields", "lrp_mlp", "runs_forward_of"]


class ViTAdapter(Adapter):
    """Every block sees all tokens: one 'window' of N = prefix + h*w tokens."""

    family = "vit"

    def __init__(self, model: nn.Module) -> None:
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or pool not in ("token", "avg"):
            raise UnsupportedModelError(
                f"{type(model).__name__} with global_pool={pool!r}: lnstd supports "
                "global_pool='token' (class token) and 'avg' (mean of tokens)"
            )
        if pool == "token" and getattr(model, "cls_token", None) is None:
            raise UnsupportedModelError(f"{type(model).__name__} pools the 'token' but has no class token")
        self.pool = pool
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        super().__init__(model)

    def _find_blocks(self) -> list[BlockRef]:
        refs = []
        for i, blk in enumerate(self.model.blocks):
            attn = getattr(blk, "attn", None)
            norm1 = getattr(blk, "norm1", None)
            drop = getattr(attn, "attn_drop", None)
            # Pre-norm blocks only: in ResPostBlock norm1 follows attention, so its input is
            # not what attention mixes, and parallel blocks have no single attention.
            if not isinstance(blk, Block) or drop is None or norm1 is None or not hasattr(attn, "fused_attn"):
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} block {i} is a {type(blk).__name__} with "
                    f"{type(attn).__name__} attention; lnstd supports timm's pre-norm Block with "
                    "its standard Attention"
                )
            # The fused capture rebuilds A from q, k: exact for timm's plain Attention (no mask,
            # no rotary embedding) computed by its own forward (a subclass may keep it); other
            # attention modules are captured unfused.
            fused = runs_forward_of(attn, Attention) and all(
                hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "norm", "scale")
            )
            refs.append(
                BlockRef(
                    i, 0, blk, norm1, attn, drop,
                    qkv=attn.qkv if fused else None,
                    qk_norm=(attn.q_norm, attn.k_norm) if fused else None,
                    out=attn.norm if fused else None,
                    **(lrp_fields(lrp_block(blk, False, Attention, attn.norm)) if fused else {}),
                )
            )  # fmt: skip
        if not refs:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no blocks")
        return refs

    def checkpointing_modules(self) -> list[nn.Module]:
        return [self.model]

    def window_map(self, block: BlockRef, input_shape: torch.Size, device: torch.device) -> WindowMap:
        n = input_shape[1]
        return WindowMap(torch.arange(n, device=device).unsqueeze(0), n)

    def readout_start(self, input_shape: torch.Size, batch: int, device: torch.device) -> torch.Tensor:
        n = input_shape[1]
        v = torch.zeros(batch, n, device=device)
        if self.pool == "token":
            v[:, 0] = 1.0
        else:
            # The head averages exactly these rows (timm: patch tokens unless pool_include_prefix).
            v[:, 0 if self.pool_include_prefix else self.num_prefix :] = 1.0
        return v

    def grid(self, n_tokens: int) -> tuple[int, int]:
        """The patch grid, from the patch embedding and checked against the token count."""
        pe = self.model.patch_embed
        img = getattr(self, "_img_size", None) or pe.img_size
        h, w = pe.dynamic_feat_size(img) if hasattr(pe, "dynamic_feat_size") else pe.grid_size
        if h * w != n_tokens - self.num_prefix:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: {n_tokens - self.num_prefix} patch tokens do not "
                f"form the {h}x{w} grid of a {tuple(img)} input"
            )
        return int(h), int(w)

    def set_input_size(self, hw: tuple[int, int]) -> None:
        self._img_size = hw

    def to_grid(self, v: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        h, w = self.grid(input_shape[1])
        return v[:, self.num_prefix :].reshape(v.shape[0], h, w)

    def patch_features(self, f: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return f[:, self.num_prefix :], self.grid(f.shape[1])

    def lrp_head(self) -> HeadRef | None:
        m = self.model
        if not isinstance(m.head, nn.Linear):
            return None
        # forward_features ends with norm (Identity when fc_norm is used); forward_head pools,
        # applies fc_norm and the head Linear.
        norms = (getattr(m, name, nn.Identity()) for name in ("norm_pre", "norm", "fc_norm"))
        return HeadRef(tokens=m.norm, fc=m.head, norms=_norms(*norms))

    def embedding_grid(self, r: torch.Tensor) -> torch.Tensor:
        r = r.float().sum(dim=-1)
        if r.ndim == 3:  # dynamic-size models keep the patch embedding's (B, h, w, C) layout
            return r
        h, w = self.grid(r.shape[1] + self.num_prefix)
        return r.reshape(r.shape[0], h, w)


def _norms(*modules: nn.Module) -> tuple[nn.Module, ...]:
    return tuple(m for m in modules if not isinstance(m, nn.Identity))


def runs_forward_of(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is a ``cls`` (or a subclass) whose forward is ``cls``'s own: what a rule that reads
    the forward's intermediate tensors needs, whatever the class is called."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def lrp_mlp(mlp: nn.Module) -> tuple[nn.Module | None, tuple[nn.Module, ...]] | None:
    """timm's MLPs (and subclasses) as the LRP rules see them: (fc1, ()) for ``Mlp``; (None, the
    modules whose outputs hold the two factors of the gated product) for ``SwiGLU`` (separate
    ``fc1_g``, ``fc1_x``) and ``GluMlp`` (one ``fc1`` holding both halves); None for any other MLP."""
    if isinstance(mlp, Mlp):
        return mlp.fc1, ()
    if isinstance(mlp, SwiGLU):
        return None, (mlp.fc1_g, mlp.fc1_x)
    if isinstance(mlp, GluMlp):
        return None, (mlp.fc1,)
    return None


def lrp_fields(view: LRPRef | str) -> dict[str, LRPRef | str]:
    """``BlockRef`` fields for a block's LRP view, or for the reason it has none."""
    return {"lrp": view} if isinstance(view, LRPRef) else {"lrp_problem": view}


def lrp_block(blk: nn.Module, post: bool, attention: type[nn.Module], out: nn.Module) -> LRPRef | str:
    """The LRP view of a block ``x + drop_path1(...attn...)``, ``+ drop_path2(...mlp...)`` (pre- or
    post-norm, layer-scale inside the branch) whose attention is an ``attention`` (or a subclass).

    Args:
        blk: the block (``norm1``, ``attn``, ``norm2``, ``mlp``, ``drop_path1``, ``drop_path2``).
        post: whether its norms follow the branches (``x + norm1(attn(x))``).
        attention: the attention class the LRP rules are written for; others are refused.
        out: the module whose input is the attention output ``A V`` (heads merged).
    """
    attn, mlp = blk.attn, blk.mlp
    if not isinstance(attn, attention):
        return (
            f"its {type(attn).__name__} attention is not {attention.__name__}, for which the LRP rules "
            "are written"
        )
    if getattr(attn, "gate", None) is not None:
        return "its attention output is gated (x * sigmoid(gate(x))), for which no LRP rule is implemented"
    parts = lrp_mlp(mlp)
    if parts is None:
        return f"its MLP is a {type(mlp).__name__}; the LRP rules know Mlp, SwiGLU and GluMlp"
    fc1, gates = parts
    keep = (blk.norm1, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
    keep += (getattr(attn, "norm", None), blk.norm2, getattr(mlp, "norm", None))
    return LRPRef(
        proj=attn.proj, mid=mlp if post else blk.norm2, fc1=fc1, act=mlp.act, fc2=mlp.fc2,
        branch1=blk.drop_path1, branch2=blk.drop_path2,
        norms=_norms(*(m for m in keep if m is not None)), gate_inputs=gates, out=out,
    )  # fmt: skip
