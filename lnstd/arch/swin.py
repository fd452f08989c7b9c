"""Adapter for timm ``SwinTransformer`` (v1): shifted windows, padding and patch merging."""

from __future__ import annotations

import torch
from timm.layers import ClassifierHead, Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from torch import nn

from .base import (
    Adapter,
    AttentionParts,
    BlockRef,
    HeadRef,
    LRPRef,
    MergeRef,
    UnsupportedModelError,
    WindowMap,
)
from .vit import runs_forward_of

__all__ = ["SwinAdapter", "swin_window_index"]


def swin_window_index(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Grid token held by each window slot, as timm lays windows out (roll by -shift, pad, partition).

    Returns (nW, wh*ww) long; padding slots hold ``height * width``.
    """
    n = height * width
    idx = torch.arange(n, device=device).view(height, width)
    if any(shift):
        idx = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    pad_h = (window[0] - height % window[0]) % window[0]
    pad_w = (window[1] - width % window[1]) % window[1]
    idx = torch.nn.functional.pad(idx, (0, pad_w, 0, pad_h), value=n)
    hp, wp = idx.shape
    idx = idx.view(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3)
    return idx.reshape(-1, window[0] * window[1])


class SwinAdapter(Adapter):
    """Token space of a block = its stage grid (H_s x W_s, row-major); no prefix tokens."""

    family = "swin"
    merging: type[nn.Module] = PatchMerging  # timm's patch merging of this family

    def __init__(self, model: nn.Module) -> None:
        pool = getattr(model, "global_pool", "avg")
        if pool != "avg":
            raise UnsupportedModelError(
                f"{type(model).__name__} with global_pool={pool!r}: lnstd supports Swin with "
                "global_pool='avg'"
            )
        super().__init__(model)
        self._maps: dict[tuple, WindowMap] = {}

    def _find_blocks(self) -> list[BlockRef]:
        refs: list[BlockRef] = []
        for s, stage in enumerate(self.model.layers):
            for blk in stage.blocks:
                attn = getattr(blk, "attn", None)
                drop = getattr(attn, "attn_drop", None)
                if (
                    not isinstance(blk, SwinTransformerBlock)
                    or drop is None
                    or not hasattr(attn, "fused_attn")
                    or not hasattr(blk, "shift_size")
                ):
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__} block {len(refs)} ({type(blk).__name__}) "
                        "is not a timm SwinTransformerBlock with WindowAttention"
                    )
                fused = runs_forward_of(attn, WindowAttention) and hasattr(attn, "qkv")
                mlp = blk.mlp
                lrp = None
                if fused and isinstance(mlp, Mlp):
                    lrp = LRPRef(
                        proj=attn.proj,
                        mid=blk.norm2,
                        fc1=mlp.fc1,
                        act=mlp.act,
                        fc2=mlp.fc2,
                        branch1=blk.drop_path1,
                        branch2=blk.drop_path2,
                        norms=tuple(
                            m for m in (blk.norm1, blk.norm2, mlp.norm) if not isinstance(m, nn.Identity)
                        ),
                    )
                refs.append(
                    BlockRef(
                        len(refs), s, blk, blk.norm1, attn, drop,
                        qkv=attn.qkv if fused else None,
                        out=attn.proj if fused else None,
                        lrp=lrp,
                    )
                )  # fmt: skip
        return refs

    def checkpointing_modules(self) -> list[nn.Module]:
        return list(self.model.layers)

    def attention_bias(self, block: BlockRef, parts: AttentionParts) -> torch.Tensor | None:
        # timm WindowAttention: relative position bias (heads, T, T), plus the shift mask
        # (nW, T, T) per window, repeated over the batch (windows are batch-major).
        bias = block.attn._get_rel_pos_bias()
        if parts.mask is None:
            return bias
        nw, t, _ = parts.mask.shape
        mask = parts.mask.view(1, nw, 1, t, t).expand(parts.q.shape[0] // nw, -1, -1, -1, -1)
        return bias + mask.reshape(-1, 1, t, t)

    def window_map(self, block: BlockRef, input_shape: torch.Size, device: torch.device) -> WindowMap:
        _, h, w, _ = input_shape
        window = tuple(block.block.window_size)
        shift = tuple(block.block.shift_size)
        key = (h, w, window, shift, str(device))
        if key not in self._maps:
            self._maps[key] = WindowMap(swin_window_index(h, w, window, shift, device), h * w)
        return self._maps[key]

    def readout_start(self, input_shape: torch.Size, batch: int, device: torch.device) -> torch.Tensor:
        _, h, w, _ = input_shape
        return torch.ones(batch, h * w, device=device)

    def step_down(self, v: torch.Tensor, upper_shape: torch.Size, lower_shape: torch.Size) -> torch.Tensor:
        (_, hc, wc, _), (_, hf, wf, _) = upper_shape, lower_shape
        if (hc, wc) == (hf, wf):
            return v
        # Patch merging: each coarse token is the average of its 2x2 children (padding dropped).
        grid = v.view(v.shape[0], hc, wc)
        fine = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :hf, :wf] / 4.0
        return fine.reshape(v.shape[0], hf * wf)

    def to_grid(self, v: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        _, h, w, _ = input_shape
        return v.reshape(v.shape[0], h, w)

    def patch_features(self, f: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        b, h, w, c = f.shape
        return f.reshape(b, h * w, c), (h, w)

    def lrp_head(self) -> HeadRef | None:
        head = self.model.head
        if not isinstance(head, ClassifierHead) or not isinstance(getattr(head, "fc", None), nn.Linear):
            return None
        norms = [m.norm for m in self.lrp_merges().values()] + [self.model.norm]
        return HeadRef(tokens=self.model.norm, fc=head.fc, norms=tuple(norms))

    def lrp_merges(self) -> dict[int, MergeRef]:
        merges, first = {}, 0
        for stage in self.model.layers:
            ds = stage.downsample
            if isinstance(ds, self.merging):
                merges[first] = MergeRef(ds, ds.norm, ds.reduction)
            elif not isinstance(ds, nn.Identity):
                raise UnsupportedModelError(f"Swin downsample {type(ds).__name__} is not timm's PatchMerging")
            first += len(stage.blocks)
        return merges

    def unmerge(self, r: torch.Tensor, fine_shape: torch.Size) -> torch.Tensor:
        # timm PatchMerging: pad to even, reshape (B, h, 2, w, 2, C), permute to (B, h, w, dw, dh, C),
        # flatten: feature (dw * 2 + dh) * C + c. Undo it and drop the padding.
        b, h, w, _ = r.shape
        _, hf, wf, c = fine_shape
        fine = r.reshape(b, h, w, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * h, 2 * w, c)
        return fine[:, :hf, :wf].reshape(b, hf * wf, c)

    def embedding_grid(self, r: torch.Tensor) -> torch.Tensor:
        return r.float().sum(dim=-1)  # Swin's patch embedding output is (B, h, w, C)
