"""A slow, literal reference of METHODS.md: one image at a time, explicit N x N matrices.

Independent of the fast path: its own hooks, its own Swin window densification (computed slot by
slot from the definition), an explicit merge matrix, and full matrix chains. Where LayerNorm sits
(before the attention or after it) is observed, not looked up: a block is pre-norm when its norm1
receives the block's own input.
"""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2

GRID_MODELS = (SwinTransformer, SwinTransformerV2)  # token space = stage grid, pooled over all tokens


def _blocks(model):
    if isinstance(model, GRID_MODELS):
        return [b for stage in model.layers for b in stage.blocks]
    return list(model.blocks)


def capture_one(model, image, target=None):
    """Per-block A (H,N',N'), G, LN1 input x, norm1 output F and dy/dF for ONE image (1,3,H,W)."""
    blocks = _blocks(model)
    saved_fused = [getattr(b.attn, "fused_attn", None) for b in blocks]  # Swin V2 has no fused path
    for b, f in zip(blocks, saved_fused):
        if f is not None:
            b.attn.fused_attn = False
    recs = [dict() for _ in blocks]
    hooks = []
    for rec, b in zip(recs, blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("in", a[0])))
        hooks.append(b.attn.attn_drop.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("A", o)))
        hooks.append(b.norm1.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0])))
        hooks.append(b.norm1.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("F", o)))
    try:
        x = image.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            for r in recs:  # post-norm (Swin V2, EVA post-norm): norm1 normalises the attention's output
                r["post_norm"] = not (r["x"].shape == r["in"].shape and torch.equal(r["x"], r["in"]))
            # Grad-CAM's layer: the last attention's input (norm1 output; post-norm: the block input)
            last = recs[-1]
            if last["post_norm"]:
                last["F"] = last["in"]
            c = int(logits.argmax()) if target is None else int(target)
            grads = torch.autograd.grad(logits[0, c], [r["A"] for r in recs] + [last["F"]])
    finally:
        for h in hooks:
            h.remove()
        for b, f in zip(blocks, saved_fused):
            if f is not None:
                b.attn.fused_attn = f
    for r, g in zip(recs, grads[:-1]):
        r["G"] = g
    recs[-1]["dF"] = grads[-1]
    return recs, blocks


def ln_std(norm, x):
    x = x.double()
    if not isinstance(norm, torch.nn.LayerNorm):  # RMSNorm: root mean square, no centring
        return torch.sqrt((x**2).mean(-1) + norm.eps)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1)
    return torch.sqrt(var + norm.eps)


def densify(block, win_mats, grid):
    """Window matrices (nW, T, T) of a Swin block -> dense (H*W, H*W) matrix on the stage grid."""
    H, W = grid
    ws_h, ws_w = block.window_size
    sh, sw = block.shift_size
    Wp = -(-W // ws_w) * ws_w
    n_win_w = Wp // ws_w
    dense = torch.zeros(H * W, H * W, dtype=win_mats.dtype)
    pos = {}
    for w in range(win_mats.shape[0]):
        for a in range(ws_h * ws_w):
            r = (w // n_win_w) * ws_h + a // ws_w  # place in the rolled, padded grid
            c = (w % n_win_w) * ws_w + a % ws_w
            if r < H and c < W:
                pos[(w, a)] = ((r + sh) % H) * W + (c + sw) % W
    for (w, a), i in pos.items():
        for (w2, b), j in pos.items():
            if w2 == w:
                dense[i, j] = win_mats[w, a, b]
    return dense


def merge_matrix(coarse, fine):
    (hc, wc), (hf, wf) = coarse, fine
    m = torch.zeros(hc * wc, hf * wf, dtype=torch.float64)
    for r in range(hf):
        for c in range(wf):
            m[(r // 2) * wc + c // 2, r * wf + c] = 0.25
    return m


def reference_heatmap(
    model, image, method, blocks=None, std="inverse", normalize="matrix", target=None, relevance=None
):
    """Heatmap (h, w) of one image, straight from METHODS.md, in float64.

    ``relevance``: per-block window-layout matrices used instead of A in ``mean_h (G ⊙ A)^+`` (the LRP
    relevance of A turns ``gae`` into ``transformer_attribution`` and ``lnstd`` into its TA base).
    """
    recs, mods = capture_one(model, image, target)
    if relevance is not None:
        for rec, r in zip(recs, relevance):
            rec["A"] = r
    swin = isinstance(model, GRID_MODELS)
    L = len(mods)
    if blocks is None:
        blocks = 2 if (swin and method == "lnstd") else "all"
    if method in ("attention", "gradcam"):
        blocks = 1
    sel = list(range(L)) if blocks == "all" else list(range(L - blocks, L))

    grids, mats_A, mats_G, stds = [], [], [], []
    for b, rec in zip(mods, recs):
        x = rec["x"][0]
        A = rec["A"].double()
        G = rec["G"].double()
        if swin:
            H, W = x.shape[0], x.shape[1]
            grids.append((H, W))
            mats_A.append(torch.stack([densify(b, A[:, h], (H, W)) for h in range(A.shape[1])]))
            mats_G.append(torch.stack([densify(b, G[:, h], (H, W)) for h in range(G.shape[1])]))
            stds.append(ln_std(b.norm1, x).reshape(-1))
        else:
            grids.append(None)
            mats_A.append(A[0])
            mats_G.append(G[0])
            stds.append(ln_std(b.norm1, x))

    if method == "gradcam":
        F_ = recs[-1]["F"][0].double()
        dF = recs[-1]["dF"][0].double()
        if swin:
            H, W = F_.shape[:2]
            F_, dF = F_.reshape(H * W, -1), dF.reshape(H * W, -1)
            P, (h, w) = 0, (H, W)
        else:
            P = model.num_prefix_tokens
            h, w = model.patch_embed.grid_size
        wts = dF[P:].mean(0)
        return torch.relu((F_[P:] * wts).sum(-1)).reshape(h, w)

    def per_block(k):
        A, G = mats_A[k], mats_G[k]
        n = A.shape[-1]
        if method in ("attention",):
            return A.mean(0)
        if method == "rollout":
            m = torch.eye(n, dtype=A.dtype) + A.mean(0)
            return m / m.sum(1, keepdim=True)
        abar = (G * A).clamp(min=0).mean(0)
        if method == "gae":
            return abar
        w = {"inverse": 1 / stds[k], "multiply": stds[k], "none": torch.ones(n, dtype=A.dtype)}[std]
        # pre-norm: token j enters attention divided by s_j (columns); post-norm: output i leaves it
        # divided by s_i (rows)
        m = torch.diag(w) @ abar if recs[k]["post_norm"] else abar @ torch.diag(w)
        if normalize == "matrix":
            m = m / m.sum()
        elif normalize == "row":
            m = m / m.sum(1, keepdim=True)
        return m

    residual = method in ("gae", "lnstd")
    R = None
    for k in sel:
        n = mats_A[k].shape[-1]
        if R is None:
            R = torch.eye(n, dtype=torch.float64)
            R0 = R.clone()  # the identity's part of R: the mergings alone
            if not residual:
                R = per_block(k)
                prev = k
                continue
        elif swin and grids[k] != grids[prev]:
            R = merge_matrix(grids[k], grids[prev]) @ R
            R0 = merge_matrix(grids[k], grids[prev]) @ R0
        M = per_block(k)
        R = R + M @ R if residual else M @ R
        prev = k
    if residual:  # residual chains: the map is read from R minus its identity part (METHODS readout)
        R = R - R0

    if swin:
        H, W = grids[sel[0]]
        return R.sum(0).reshape(H, W)
    P = model.num_prefix_tokens
    h, w = model.patch_embed.grid_size
    if isinstance(model, VisionTransformerDistilled):
        row = (R[0] + R[1]) / 2  # eval: (head(x[:, 0]) + head_dist(x[:, 1])) / 2
    elif model.global_pool == "token":
        row = R[0]
    else:  # ViT may pool the prefix too; Eva and Beit average x[:, P:]
        rows = slice(0, None) if getattr(model, "pool_include_prefix", False) else slice(P, None)
        row = R[rows].sum(0)
    return row[P:].reshape(h, w)
