"""A slow, literal float64 reference of the two LRP methods (docs/lrp.md), one image at a time.

Independent of ``lnstd.lrp``: a float64 copy of the model runs timm's own (unfused) forward while this
file's hooks record every layer's input and output; then each layer's relevance is written out from
the papers' rules in the order of timm's forward, as explicit sums over contributions
``z_ij = x_i w_ji`` (no gradients, no modified backward). Swin windows and patch merging are undone slot
by slot from their definitions, like ``reference.densify``.
"""

from __future__ import annotations

import copy

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

# --- recording ---------------------------------------------------------------------------------------


def _is_swin(model) -> bool:
    return isinstance(model, SwinTransformer)


def _blocks(model):
    if _is_swin(model):
        return [b for stage in model.layers for b in stage.blocks]
    return list(model.blocks)


def record(model, image):
    """Run a float64 copy of ``model`` on one image, recording each layer's input and output."""
    m = copy.deepcopy(model).double().eval()
    rec: dict = {}
    hooks = []

    def io(key, module, windows=False):
        # one image: drop the batch axis, except inside attention, whose leading axis is the
        # windows (ViT: a single window of all tokens)
        def hook(_m, args, out):
            rec[key + ".in"] = args[0].detach() if windows else args[0].detach()[0]
            rec[key + ".out"] = out.detach() if windows else out.detach()[0]

        hooks.append(module.register_forward_hook(hook))

    def mask_hook(key):
        def hook(_m, args, kwargs):
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            rec[key] = None if mask is None else mask.detach()

        return hook

    for k, b in enumerate(_blocks(m)):
        b.attn.fused_attn = False
        p = f"b{k}."
        for name in ("norm1", "norm2", "drop_path1", "drop_path2"):
            io(p + name, getattr(b, name))
        for name in ("qkv", "proj", "attn_drop"):
            io(p + name, getattr(b.attn, name), windows=True)
        for name in ("fc1", "fc1_g", "fc1_x", "act", "fc2"):
            if hasattr(b.mlp, name):
                io(p + name, getattr(b.mlp, name))
        if not _is_swin(m):
            io(p + "q_norm", b.attn.q_norm, windows=True)
            io(p + "k_norm", b.attn.k_norm, windows=True)
        hooks.append(b.attn.register_forward_pre_hook(mask_hook(p + "mask"), with_kwargs=True))
        hooks.append(
            b.register_forward_pre_hook(lambda _m, a, p=p: rec.__setitem__(p + "x", a[0].detach()[0]))
        )
    io("embed", m.patch_embed)
    if _is_swin(m):
        for s, stage in enumerate(m.layers):
            if not isinstance(stage.downsample, nn.Identity):
                io(f"merge{s}", stage.downsample)
                io(f"merge{s}.norm", stage.downsample.norm)
                io(f"merge{s}.reduction", stage.downsample.reduction)
        io("norm", m.norm)
        io("fc", m.head.fc)
    else:
        for name in ("norm", "fc_norm", "head"):
            io(name, getattr(m, name))
    try:
        with torch.no_grad():
            logits = m(image.double())[0]
    finally:
        for h in hooks:
            h.remove()
    return m, rec, logits


# --- shared helpers ------------------------------------------------------------------------------------


def div(a, b):
    """a / b with 0 where b == 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def window_slots(block, H, W):
    """[(window, slot, grid token)] for the non-padding slots of a Swin block, from the definition."""
    wh, ww = block.window_size
    sh, sw = block.shift_size
    n_win_w = -(-W // ww)
    n_win = -(-H // wh) * n_win_w
    out = []
    for w in range(n_win):
        for a in range(wh * ww):
            r = (w // n_win_w) * wh + a // ww  # place in the rolled, padded grid
            c = (w % n_win_w) * ww + a % ww
            if r < H and c < W:
                out.append((w, a, ((r + sh) % H) * W + (c + sw) % W))
    return out


def to_windows(r_tokens, slots, n_win, T):
    out = torch.zeros(n_win, T, r_tokens.shape[-1], dtype=r_tokens.dtype)
    for w, a, p in slots:
        out[w, a] = r_tokens[p]
    return out


def from_windows(r_win, slots, N):
    out = torch.zeros(N, r_win.shape[-1], dtype=r_win.dtype)
    for w, a, p in slots:
        out[p] += r_win[w, a]
    return out


def unmerge(r4, fine_hw):
    """(h, w, 4C) relevance of timm's PatchMerging features -> (H*W, C): feature block f = 2 * dw + dh
    holds fine pixel (2i + dh, 2j + dw) (timm: reshape (h, 2, w, 2, C), permute to (h, w, dw, dh, C))."""
    h, w, c4 = r4.shape
    c = c4 // 4
    H, W = fine_hw
    out = torch.zeros(H * W, c, dtype=r4.dtype)
    for i in range(h):
        for j in range(w):
            for dh in range(2):
                for dw in range(2):
                    if 2 * i + dh < H and 2 * j + dw < W:
                        f = 2 * dw + dh
                        out[(2 * i + dh) * W + 2 * j + dw] = r4[i, j, f * c : (f + 1) * c]
    return out


def split_heads(t, heads):
    """(T, 3 * heads * d) qkv output -> three (heads, T, d), in timm's packing."""
    T = t.shape[0]
    qkv = t.reshape(T, 3, heads, -1).permute(1, 2, 0, 3)
    return qkv[0], qkv[1], qkv[2]


def join_heads(rq, rk, rv):
    T = rq.shape[1]
    return torch.stack([rq, rk, rv]).permute(2, 0, 1, 3).reshape(T, -1)


# --- transformer attribution (Chefer et al. 2021a) ------------------------------------------------------


def sdiv(a, b):
    """The authors' safe_divide: a / (b + 1e-9), 0 where b == 0."""
    den = b + 1e-9
    den = den + (den == 0) * 1e-9
    return a / den * (b != 0)


def ta_linear(x, W, R):
    """alpha=1, beta=0: R_i = sum_j z+_ji / sum_i' z+_ji' R_j with z+_ji = max(x_i w_ji, 0)."""
    z = torch.clamp(x[:, None, :] * W[None, :, :], min=0)  # (n, j, i)
    return (z * sdiv(R, z.sum(-1))[:, :, None]).sum(1)


def ta_add(a, b, R):
    s = sdiv(R, a + b)
    ra, rb = a * s, b * s
    sa, sb = ra.sum(), rb.sum()
    fa = sdiv(sa.abs(), sa.abs() + sb.abs()) * R.sum()
    fb = sdiv(sb.abs(), sa.abs() + sb.abs()) * R.sum()
    return ra * sdiv(fa, sa), rb * sdiv(fb, sb)


def ta_clone(x, r1, r2):
    return x * (sdiv(r1, x) + sdiv(r2, x))


def ta_matmul(a, b, R):
    """Z = a @ b (per head); each operand gets half of RelPropSimple's share."""
    c = a[..., :, :, None] * b[..., None, :, :]  # (.., i, j, d) = a_ij b_jd
    s = sdiv(R, c.sum(-2))  # (.., i, d)
    return (c * s[..., :, None, :]).sum(-1) / 2, (c * s[..., :, None, :]).sum(-3) / 2


@torch.no_grad()
def ta_attention_relevance(model, image, target):
    """R_A of every block (window layout (nW, heads, T, T)), walking the authors' relprop down."""
    m, rec, _ = record(model, image)
    swin = _is_swin(m)
    blocks = _blocks(m)
    # head: Linear, then pooling (IndexSelect / mean: RelPropSimple), final norms: identity
    fc = "fc" if swin else "head"
    onehot = torch.zeros(rec[fc + ".out"].shape[-1], dtype=torch.float64)
    onehot[target] = 1.0
    r_feat = ta_linear(rec[fc + ".in"][None], m.get_classifier().weight, onehot[None])[0]
    tokens = rec["norm.out"]
    tokens = tokens.reshape(-1, tokens.shape[-1])
    if not swin and m.global_pool == "token":
        R = torch.zeros_like(tokens)
        R[0] = tokens[0] * sdiv(r_feat, tokens[0])
    else:
        rows = slice(0, None) if swin else slice(m.num_prefix_tokens, None)
        n = tokens[rows].shape[0]
        R = torch.zeros_like(tokens)
        R[rows] = tokens[rows] / n * sdiv(r_feat, tokens[rows].mean(0))
    out = [None] * len(blocks)
    merge_at = {}
    if swin:
        first = 0
        for s, stage in enumerate(m.layers):
            if f"merge{s}.in" in rec:
                merge_at[first] = s
            first += len(stage.blocks)
    for k in reversed(range(len(blocks))):
        blk, p = blocks[k], f"b{k}."
        heads = blk.attn.num_heads
        x = rec[p + "x"].reshape(-1, rec[p + "x"].shape[-1])
        mid = rec[p + "norm2.in"].reshape(x.shape)
        b2 = rec[p + "drop_path2.out"].reshape(x.shape)
        b1 = rec[p + "drop_path1.out"].reshape(x.shape)
        r_mid, r_b2 = ta_add(mid, b2, R)
        r_h = ta_linear(rec[p + "fc2.in"].reshape(-1, rec[p + "fc2.in"].shape[-1]), blk.mlp.fc2.weight, r_b2)
        r_n2 = ta_linear(rec[p + "fc1.in"].reshape(x.shape), blk.mlp.fc1.weight, r_h)
        r_mid = ta_clone(mid, r_mid, r_n2)
        r_x, r_b1 = ta_add(x, b1, r_mid)
        if swin:
            H, W = rec[p + "x"].shape[:2]
            slots = window_slots(blk, H, W)
            n_win, T = rec[p + "qkv.in"].shape[:2]
            r_proj = to_windows(r_b1, slots, n_win, T)
        else:
            r_proj = r_b1[None]
        proj_in = rec[p + "proj.in"]
        r_o = torch.stack(
            [ta_linear(proj_in[w], blk.attn.proj.weight, r_proj[w]) for w in range(len(proj_in))]
        )
        A = rec[p + "attn_drop.out"]  # (nW, heads, T, T)
        q, kk, v = zip(*[split_heads(t, heads) for t in rec[p + "qkv.out"]])
        q, kk, v = torch.stack(q), torch.stack(kk), torch.stack(v)
        if not swin:
            q, kk = rec[p + "q_norm.out"], rec[p + "k_norm.out"]
        r_oh = r_o.reshape(r_o.shape[0], r_o.shape[1], heads, -1).transpose(1, 2)
        r_a, r_v = ta_matmul(A, v, r_oh)
        out[k] = r_a
        r_q, r_kt = ta_matmul(q, kk.transpose(-2, -1), r_a)
        r_qkv = [join_heads(r_q[w], r_kt[w].transpose(-2, -1), r_v[w]) for w in range(len(r_q))]
        r_in = torch.stack(
            [ta_linear(rec[p + "qkv.in"][w], blk.attn.qkv.weight, r_qkv[w]) for w in range(len(r_qkv))]
        )
        r_n1 = from_windows(r_in, slots, x.shape[0]) if swin else r_in[0]
        R = ta_clone(x, r_x, r_n1)
        if k in merge_at:
            s = merge_at[k]
            red_in = rec[f"merge{s}.reduction.in"]
            r4 = ta_linear(red_in.reshape(-1, red_in.shape[-1]), m.layers[s].downsample.reduction.weight, R)
            R = unmerge(r4.reshape(*red_in.shape[:2], -1), rec[f"merge{s}.in"].shape[:2])
    return out


# --- AttnLRP (Achtibat et al. 2024), explicit rules ------------------------------------------------------


def eps_linear(x, W, z, R):
    """Epsilon rule, epsilon = 0: R_i = sum_j x_i w_ji R_j / z_j (z with the bias, which keeps its share)."""
    return (x[:, None, :] * W[None, :, :] * div(R, z)[:, :, None]).sum(1)


def ln_rule(x, y, beta, R):
    """LayerNorm, std held constant: + beta (epsilon rule: beta keeps its share), * weight and / std
    (single-input maps: relevance unchanged), x - mean(x) (linear: epsilon rule)."""
    R = R if beta is None else div(y - beta, y) * R
    c = x - x.mean(-1, keepdim=True)
    ratio = div(R, c)
    return x * (ratio - ratio.mean(-1, keepdim=True))


def _norm(module, x, y, R):
    if isinstance(module, nn.Identity):
        return R
    return ln_rule(x, y, module.bias, R)


def _flat(t):
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def reference_attnlrp(model, image, target=None):
    """AttnLRP of one image.

    Returns:
        dict: ``heat`` (h, w) token relevance at the patch embedding output; ``inputs``, the relevance
        of every token at the first block's input (prefix tokens included) summed; ``absorbed``, per
        block, what the softmax rule does not pass on (sum R_A - sum R_logits); ``logit``.
    """
    m, rec, logits = record(model, image)
    swin = _is_swin(m)
    blocks = _blocks(m)
    c = int(logits.argmax()) if target is None else int(target)
    fc = "fc" if swin else "head"
    R_out = torch.zeros_like(logits)
    R_out[c] = logits[c]
    r_feat = eps_linear(
        rec[fc + ".in"][None], m.get_classifier().weight, rec[fc + ".out"][None], R_out[None]
    )[0]
    if not swin:
        r_feat = _norm(m.fc_norm, rec["fc_norm.in"], rec["fc_norm.out"], r_feat)
    tokens = _flat(rec["norm.out"])
    R = torch.zeros_like(tokens)
    if not swin and m.global_pool == "token":
        R[0] = r_feat
    else:
        rows = slice(0, None) if swin else slice(m.num_prefix_tokens, None)
        n = tokens[rows].shape[0]
        R[rows] = div(tokens[rows] / n * r_feat, tokens[rows].mean(0).expand_as(tokens[rows]))
    R = _norm(m.norm, _flat(rec["norm.in"]), tokens, R)
    absorbed = [0.0] * len(blocks)
    merge_at = {}
    if swin:
        first = 0
        for s, stage in enumerate(m.layers):
            if f"merge{s}.in" in rec:
                merge_at[first] = s
            first += len(stage.blocks)
    for k in reversed(range(len(blocks))):
        blk, p = blocks[k], f"b{k}."
        heads, attn = blk.attn.num_heads, blk.attn
        x = _flat(rec[p + "x"])
        mid, b1, b2 = (
            rec[p + "norm2.in"].reshape(x.shape),
            _flat(rec[p + "drop_path1.out"]),
            rec[p + "drop_path2.out"],
        )
        out = mid + b2
        r_mid, r_b2 = div(mid, out) * R, div(b2, out) * R  # residual add: epsilon rule
        # layer-scale, drop-path, dropout: single-input, relevance unchanged
        r = eps_linear(rec[p + "fc2.in"], blk.mlp.fc2.weight, rec[p + "fc2.out"], r_b2)
        if hasattr(blk.mlp, "fc1_g"):  # SwiGLU: act(g) * u, uniform rule: half to each factor
            # the activation on the gate: identity rule
            r_g = eps_linear(rec[p + "fc1_g.in"], blk.mlp.fc1_g.weight, rec[p + "fc1_g.out"], r / 2)
            r = r_g + eps_linear(rec[p + "fc1_x.in"], blk.mlp.fc1_x.weight, rec[p + "fc1_x.out"], r / 2)
        else:  # GELU: identity rule, relevance unchanged
            r = eps_linear(rec[p + "fc1.in"], blk.mlp.fc1.weight, rec[p + "fc1.out"], r)
        r = _norm(blk.norm2, rec[p + "norm2.in"], rec[p + "norm2.out"], r)
        r_mid = r_mid + r
        r_x, r_b1 = div(x, mid) * r_mid, div(b1, mid) * r_mid
        if swin:
            H, W = rec[p + "x"].shape[:2]
            slots = window_slots(blk, H, W)
            n_win, T = rec[p + "qkv.in"].shape[:2]
            r_proj = to_windows(r_b1, slots, n_win, T)
        else:
            r_proj = r_b1[None]
        nw = r_proj.shape[0]
        r_o = torch.stack(
            [
                eps_linear(rec[p + "proj.in"][w], attn.proj.weight, rec[p + "proj.out"][w], r_proj[w])
                for w in range(nw)
            ]
        )
        A = rec[p + "attn_drop.out"]
        qkv = [split_heads(t, heads) for t in rec[p + "qkv.out"]]
        q_raw, k_raw, v = (torch.stack(t) for t in zip(*qkv))
        q, kk = (rec[p + "q_norm.out"], rec[p + "k_norm.out"]) if not swin else (q_raw, k_raw)
        r_oh = r_o.reshape(nw, -1, heads, v.shape[-1]).transpose(1, 2)
        # O = A V: epsilon rule on the contributions A_ij v_jd, then half to each factor
        contrib = A[..., :, :, None] * v[..., None, :, :]
        share = contrib * div(r_oh, contrib.sum(-2))[..., :, None, :]
        r_a, r_v = share.sum(-1) / 2, share.sum(-3) / 2
        # logits: scale * q k^T (+ relative position bias, + shift mask)
        zq = (q * attn.scale) @ kk.transpose(-2, -1)
        bias = attn._get_rel_pos_bias() if swin else torch.zeros(1)
        mask = rec[p + "mask"]
        logit = zq + bias
        if mask is not None:
            logit = logit + mask[:, None]
        # softmax rule (Proposition 3.1): R_x = x (R_A - A sum_j R_A)
        r_logit = logit * (r_a - A * r_a.sum(-1, keepdim=True))
        absorbed[k] = float(r_a.sum() - r_logit.sum())
        r_z = div(zq, logit) * r_logit  # bias and mask are constants: epsilon rule on the addition
        contrib = (q * attn.scale)[..., :, None, :] * kk[..., None, :, :]  # (i, j, d)
        share = contrib * div(r_z, contrib.sum(-1))[..., None]
        r_q, r_k = share.sum(-2) / 2, share.sum(-3) / 2
        if not swin:
            qn, kn = attn.q_norm, attn.k_norm
            r_q = _norm(qn, rec[p + "q_norm.in"], rec[p + "q_norm.out"], r_q)
            r_k = _norm(kn, rec[p + "k_norm.in"], rec[p + "k_norm.out"], r_k)
        r_qkv = [join_heads(r_q[w], r_k[w], r_v[w]) for w in range(nw)]
        r_in = torch.stack(
            [
                eps_linear(rec[p + "qkv.in"][w], attn.qkv.weight, rec[p + "qkv.out"][w], r_qkv[w])
                for w in range(nw)
            ]
        )
        r_n1 = from_windows(r_in, slots, x.shape[0]) if swin else r_in[0]
        r_n1 = _norm(blk.norm1, x, _flat(rec[p + "norm1.out"]), r_n1)
        R = r_x + r_n1
        if k in merge_at:
            s = merge_at[k]
            ds = m.layers[s].downsample
            red_in, red_out = rec[f"merge{s}.reduction.in"], rec[f"merge{s}.reduction.out"]
            r4 = eps_linear(_flat(red_in), ds.reduction.weight, _flat(red_out), R)
            r4 = _norm(ds.norm, _flat(rec[f"merge{s}.norm.in"]), _flat(rec[f"merge{s}.norm.out"]), r4)
            R = unmerge(r4.reshape(*red_in.shape[:2], -1), rec[f"merge{s}.in"].shape[:2])
    inputs = float(R.sum())
    embed = rec["embed.out"]
    if swin:
        heat = R.reshape(*embed.shape[:2], -1).sum(-1)
    else:
        # x0 = prefix tokens and embed + position embedding: epsilon rule on that addition
        P = m.num_prefix_tokens
        x0 = x[P:]
        heat = (div(embed.reshape(x0.shape), x0) * R[P:]).sum(-1).reshape(m.patch_embed.grid_size)
    return {"heat": heat, "inputs": inputs, "absorbed": absorbed, "logit": float(logits[c])}
