"""A slow, literal float64 reference of the two LRP methods (docs/lrp.md), one image at a time.

Independent of ``lnstd.lrp`` and ``lnstd.arch``: a float64 copy of the model runs timm's own (unfused)
forward while this file's hooks record every layer's input and output (and each attention's keyword
arguments: masks, shared position bias, rotary embedding); then each layer's relevance is written out
from the papers' rules in the order of timm's forward, as explicit sums over contributions
``z_ij = x_i w_ji`` (no gradients, no modified backward). q, k, v, the logits and the rotary embedding
are rebuilt here from the recorded attention input and the parameters, and checked against what the
model recorded (``softmax(logits) == A``). Where the norms sit (before the branch or after it) is
observed, not looked up. Swin windows and patch merging are undone slot by slot from their definitions.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

GRID_MODELS = (SwinTransformer, SwinTransformerV2)  # token space = stage grid, pooled over all tokens

# --- recording ---------------------------------------------------------------------------------------


def _is_grid(model) -> bool:
    return isinstance(model, GRID_MODELS)


def _blocks(model):
    if _is_grid(model):
        return [b for stage in model.layers for b in stage.blocks]
    return list(model.blocks)


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def record(model, image):
    """Run a float64 copy of ``model`` on one image, recording each layer's input and output."""
    m = copy.deepcopy(model).double().eval()
    assert isinstance(getattr(m, "norm_pre", nn.Identity()), nn.Identity), "norm_pre: not in this reference"
    rec: dict = {}
    hooks = []

    def io(key, module, windows=False):
        # one image: drop the batch axis, except inside attention, whose leading axis is the
        # windows (ViT: a single window of all tokens)
        def hook(_m, args, out):
            rec[key + ".in"] = args[0].detach() if windows else args[0].detach()[0]
            rec[key + ".out"] = out.detach() if windows else out.detach()[0]

        hooks.append(module.register_forward_hook(hook))

    def call(key):
        def hook(_m, args, kwargs):
            rec[key + ".in"] = args[0].detach()
            rec[key + ".kwargs"] = {k: _detach(v) for k, v in kwargs.items()}
            if len(args) > 1:  # Swin's mask, if passed positionally
                rec[key + ".kwargs"]["mask"] = _detach(args[1])

        return hook

    for k, b in enumerate(_blocks(m)):
        if hasattr(b.attn, "fused_attn"):
            b.attn.fused_attn = False
        p = f"b{k}."
        for name in ("norm1", "norm2", "drop_path1", "drop_path2", "mlp"):
            io(p + name, getattr(b, name))
        for name in ("proj", "attn_drop"):
            io(p + name, getattr(b.attn, name), windows=True)
        for name in ("q_norm", "k_norm", "norm"):
            if isinstance(getattr(b.attn, name, None), nn.Module):
                io(p + name, getattr(b.attn, name), windows=True)
        if hasattr(b.attn, "cpb_mlp"):
            io(p + "cpb", b.attn.cpb_mlp, windows=True)
        for name in ("fc1", "fc1_g", "fc1_x", "act", "fc2", "norm"):
            if hasattr(b.mlp, name):
                io(p + "mlp." + name, getattr(b.mlp, name))
        hooks.append(b.attn.register_forward_pre_hook(call(p + "attn"), with_kwargs=True))
        hooks.append(
            b.register_forward_pre_hook(lambda _m, a, p=p: rec.__setitem__(p + "x", a[0].detach()[0]))
        )
    io("embed", m.patch_embed)
    if _is_grid(m):
        for s, stage in enumerate(m.layers):
            if not isinstance(stage.downsample, nn.Identity):
                io(f"merge{s}", stage.downsample)
                io(f"merge{s}.norm", stage.downsample.norm)
                io(f"merge{s}.reduction", stage.downsample.reduction)
        io("norm", m.norm)
        io("fc", m.head.fc)
    else:
        for name in ("norm", "fc_norm", "head", "head_dist"):
            if isinstance(getattr(m, name, None), nn.Module):
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


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def _post_norm(rec, p):
    """Observed: a block is post-norm when its norm1 does not receive the block's own input."""
    x, n1 = rec[p + "x"], rec[p + "norm1.in"]
    return not (x.shape == n1.shape and torch.equal(x, n1))


def _rel_table(table, index, T):
    """(heads, T, T) bias from a relative-position table (rows: relative offsets) and its index."""
    return table[index.reshape(-1)].reshape(T, T, -1).permute(2, 0, 1)


def _rope(x, rope, half):
    """A rotary embedding from its definition (timm ``apply_rot_embed_cat``): y_j = x_j cos_j +
    sign_j x_p(j) sin_j, the partner p(j) the next/previous channel (interleaved) or the other half.

    Returns the two contributions to y (own, partner's) and the partner index."""
    sin, cos = rope.chunk(2, -1)
    d = x.shape[-1]
    j = torch.arange(d)
    if half:
        partner, sign = (j + d // 2) % d, torch.where(j < d // 2, -1.0, 1.0)
    else:
        partner, sign = j ^ 1, torch.where(j % 2 == 0, -1.0, 1.0)
    return x * cos, sign.double() * x[..., partner] * sin, partner


def attention_terms(m, blk, rec, p):
    """q, k, v, the logit product's operands and the logits of one block, rebuilt from the attention
    input and the parameters; the logits are checked against the recorded probabilities."""
    attn = blk.attn
    heads = attn.num_heads
    x_in = rec[p + "attn.in"]  # (nW, T, C)
    kwargs = rec[p + "attn.kwargs"]
    if getattr(attn, "qkv", None) is not None:
        W = attn.qkv.weight
        if getattr(attn, "q_bias", None) is not None:
            b = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        else:
            b = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
    else:  # EVA's separate projections
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        W = torch.cat([pr.weight for pr in projs])
        b = torch.cat([pr.bias if pr.bias is not None else torch.zeros(pr.out_features) for pr in projs])
    z_qkv = x_in @ W.T + b
    q_raw, k_raw, v = (torch.stack(t) for t in zip(*[split_heads(t, heads) for t in z_qkv]))
    t = {"x_in": x_in, "W": W, "z_qkv": z_qkv, "q_raw": q_raw, "k_raw": k_raw, "v": v}
    q, k = q_raw, k_raw
    if p + "q_norm.out" in rec:
        assert torch.allclose(rec[p + "q_norm.in"], q_raw, atol=1e-12)
        q, k = rec[p + "q_norm.out"], rec[p + "k_norm.out"]
    t["q_in"], t["k_in"] = q, k
    rope = kwargs.get("rope")
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        parts_q, parts_k = _rope(q[:, :, npt:], rope, half), _rope(k[:, :, npt:], rope, half)
        q = torch.cat([q[:, :, :npt], parts_q[0] + parts_q[1]], dim=2)
        k = torch.cat([k[:, :, :npt], parts_k[0] + parts_k[1]], dim=2)
        t["rope"] = (npt, parts_q, parts_k)
    if hasattr(attn, "logit_scale"):  # Swin V2: cosine attention, learned per-head logit scale
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
    else:
        scale = attn.scale
    t["q"], t["k"], t["scale"] = q, k, scale
    T = q.shape[-2]
    zq = (q * scale) @ k.transpose(-2, -1)
    bias = torch.zeros(1, dtype=zq.dtype)
    if hasattr(attn, "cpb_mlp"):  # 16 sigmoid(cpb_mlp(coords)) indexed by relative position
        table = rec[p + "cpb.out"].reshape(-1, heads)
        bias = 16 * torch.sigmoid(_rel_table(table, attn.relative_position_index, T))
    elif getattr(attn, "relative_position_bias_table", None) is not None:
        bias = _rel_table(attn.relative_position_bias_table, attn.relative_position_index, T)
    if kwargs.get("shared_rel_pos_bias") is not None:
        bias = bias + kwargs["shared_rel_pos_bias"].reshape(heads, T, T)
    logit = zq + bias
    if kwargs.get("mask") is not None:
        logit = logit + kwargs["mask"][:, None]
    A = rec[p + "attn_drop.out"]
    assert torch.allclose(logit.softmax(-1), A, atol=1e-10), "the rebuilt logits are not the model's"
    t.update(zq=zq, logit=logit, A=A)
    return t


def _merge_at(m, rec):
    """Block index -> stage whose patch merging precedes it."""
    merge_at, first = {}, 0
    if _is_grid(m):
        for s, stage in enumerate(m.layers):
            if f"merge{s}.in" in rec:
                merge_at[first] = s
            first += len(stage.blocks)
    return merge_at


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


def ta_rope(parts, R):
    """The rotation as a Linear layer without bias, alpha=1: each output's relevance to its two
    contributions (own channel, partner channel) in proportion to their positive parts."""
    own, other, partner = parts
    c1, c2 = own.clamp(min=0), other.clamp(min=0)
    s = sdiv(R, c1 + c2)
    out = c1 * s
    return out.index_add(-1, partner, c2 * s)


@torch.no_grad()
def ta_attention_relevance(model, image, target, with_input=False):
    """R_A of every block (window layout (nW, heads, T, T)), walking the authors' relprop down; with
    ``with_input``, also the relevance of the first block's input tokens, (N, C)."""
    m, rec, _ = record(model, image)
    grid = _is_grid(m)
    blocks = _blocks(m)
    onehot = torch.zeros(m.num_classes, dtype=torch.float64)
    onehot[target] = 1.0
    tokens = _flat(rec["norm.out"])
    R = torch.zeros_like(tokens)
    if isinstance(m, VisionTransformerDistilled):
        # logits = (head(t0) + head_dist(t1)) / 2: Add.relprop (the 1/2 a constant: identity), each
        # head's Linear, IndexSelect on its row
        r_a, r_b = ta_add(rec["head.out"] / 2, rec["head_dist.out"] / 2, onehot)
        for row, name, r in ((0, "head", r_a), (1, "head_dist", r_b)):
            r_feat = ta_linear(rec[name + ".in"][None], getattr(m, name).weight, r[None])[0]
            R[row] = tokens[row] * sdiv(r_feat, tokens[row])
    else:
        # head: Linear, then pooling (IndexSelect / mean: RelPropSimple), final norms: identity
        fc = "fc" if grid else "head"
        r_feat = ta_linear(rec[fc + ".in"][None], m.get_classifier().weight, onehot[None])[0]
        if not grid and m.global_pool == "token":
            R[0] = tokens[0] * sdiv(r_feat, tokens[0])
        else:
            rows = slice(0, None) if grid else slice(m.num_prefix_tokens, None)
            n = tokens[rows].shape[0]
            R[rows] = tokens[rows] / n * sdiv(r_feat, tokens[rows].mean(0))
    out = [None] * len(blocks)
    merge_at = _merge_at(m, rec)
    for k in reversed(range(len(blocks))):
        blk, p = blocks[k], f"b{k}."
        heads = blk.attn.num_heads
        x = _flat(rec[p + "x"])
        mid = _flat(rec[p + "mlp.in"] if _post_norm(rec, p) else rec[p + "norm2.in"])
        b2 = _flat(rec[p + "drop_path2.out"])
        b1 = _flat(rec[p + "drop_path1.out"])
        # norms, layer-scale, drop-path, GELU: identity
        r_mid, r_b2 = ta_add(mid, b2, R)
        r_h = ta_linear(_flat(rec[p + "mlp.fc2.in"]), blk.mlp.fc2.weight, r_b2)
        r_n2 = ta_linear(_flat(rec[p + "mlp.fc1.in"]), blk.mlp.fc1.weight, r_h)
        r_mid = ta_clone(mid, r_mid, r_n2)
        r_x, r_b1 = ta_add(x, b1, r_mid)
        t = attention_terms(m, blk, rec, p)
        if grid:
            H, W = rec[p + "x"].shape[:2]
            slots = window_slots(blk, H, W)
            n_win, T = t["x_in"].shape[:2]
            r_proj = to_windows(r_b1, slots, n_win, T)
        else:
            r_proj = r_b1[None]
        proj_in = rec[p + "proj.in"]
        r_o = torch.stack(
            [ta_linear(proj_in[w], blk.attn.proj.weight, r_proj[w]) for w in range(len(proj_in))]
        )
        r_oh = r_o.reshape(r_o.shape[0], r_o.shape[1], heads, -1).transpose(1, 2)
        r_a, r_v = ta_matmul(t["A"], t["v"], r_oh)
        out[k] = r_a
        # the product's operands (after q/k norms, rotation, L2 normalisation; scale outside)
        r_q, r_kt = ta_matmul(t["q"], t["k"].transpose(-2, -1), r_a)
        r_k = r_kt.transpose(-2, -1)
        if "rope" in t:
            npt, parts_q, parts_k = t["rope"]
            r_q = torch.cat([r_q[:, :, :npt], ta_rope(parts_q, r_q[:, :, npt:])], dim=2)
            r_k = torch.cat([r_k[:, :, :npt], ta_rope(parts_k, r_k[:, :, npt:])], dim=2)
        r_qkv = [join_heads(r_q[w], r_k[w], r_v[w]) for w in range(len(r_q))]
        r_in = torch.stack([ta_linear(t["x_in"][w], t["W"], r_qkv[w]) for w in range(len(r_qkv))])
        r_n1 = from_windows(r_in, slots, x.shape[0]) if grid else r_in[0]
        R = ta_clone(x, r_x, r_n1)
        if k in merge_at:
            s = merge_at[k]
            red_in = rec[f"merge{s}.reduction.in"]
            r4 = ta_linear(red_in.reshape(-1, red_in.shape[-1]), m.layers[s].downsample.reduction.weight, R)
            R = unmerge(r4.reshape(*red_in.shape[:2], -1), rec[f"merge{s}.in"].shape[:2])
    return (out, R) if with_input else out


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
    if not isinstance(module, nn.LayerNorm):  # RMSNorm: x / rms * weight, single-input maps
        assert type(module).__name__ in ("RmsNorm", "RMSNorm") and getattr(module, "bias", None) is None
        return R
    return ln_rule(x, y, module.bias, R)


def _mlp(blk, rec, p, r):
    """Relevance at the MLP's output -> at its input."""
    mlp, q = blk.mlp, p + "mlp."
    r = eps_linear(_flat(rec[q + "fc2.in"]), mlp.fc2.weight, _flat(rec[q + "fc2.out"]), _flat(r))
    if q + "norm.in" in rec:
        r = _norm(mlp.norm, _flat(rec[q + "norm.in"]), _flat(rec[q + "norm.out"]), r)
    kind = type(mlp).__name__
    if kind == "SwiGLU":  # act(g) * u, uniform rule: half to each factor; the activation: identity rule
        r_g = eps_linear(rec[q + "fc1_g.in"], mlp.fc1_g.weight, rec[q + "fc1_g.out"], r / 2)
        return r_g + eps_linear(rec[q + "fc1_x.in"], mlp.fc1_x.weight, rec[q + "fc1_x.out"], r / 2)
    if kind == "GluMlp":  # both factors are halves of fc1's output
        return eps_linear(
            rec[q + "fc1.in"], mlp.fc1.weight, rec[q + "fc1.out"], torch.cat([r / 2, r / 2], -1)
        )
    assert kind == "Mlp"  # GELU: identity rule, relevance unchanged
    return eps_linear(_flat(rec[q + "fc1.in"]), mlp.fc1.weight, _flat(rec[q + "fc1.out"]), r)


def _rope_eps(parts, R):
    """The rotation, epsilon rule: each output's relevance to its two contributions."""
    own, other, partner = parts
    s = div(R, own + other)
    return (own * s).index_add(-1, partner, other * s)


@torch.no_grad()
def reference_attnlrp(model, image, target=None):
    """AttnLRP of one image.

    Returns:
        dict: ``heat`` (h, w) token relevance at the patch embedding output; ``inputs``, the relevance
        of every token at the first block's input (prefix tokens included) summed; ``absorbed``, per
        block, what the softmax rule does not pass on (sum R_A - sum R_logits); ``logit``.
    """
    m, rec, logits = record(model, image)
    grid = _is_grid(m)
    blocks = _blocks(m)
    c = int(logits.argmax()) if target is None else int(target)
    R_out = torch.zeros_like(logits)
    R_out[c] = logits[c]
    tokens = _flat(rec["norm.out"])
    R = torch.zeros_like(tokens)
    if isinstance(m, VisionTransformerDistilled):
        # (head(t0) + head_dist(t1)) / 2: epsilon rule on the sum, then each head's Linear
        for row, name in ((0, "head"), (1, "head_dist")):
            y = rec[name + ".out"]
            r = div(y / 2, logits) * R_out
            R[row] = eps_linear(rec[name + ".in"][None], getattr(m, name).weight, y[None], r[None])[0]
    else:
        fc = "fc" if grid else "head"
        r_feat = eps_linear(
            rec[fc + ".in"][None], m.get_classifier().weight, rec[fc + ".out"][None], R_out[None]
        )[0]
        if not grid:
            r_feat = _norm(m.fc_norm, rec["fc_norm.in"], rec["fc_norm.out"], r_feat)
        if not grid and m.global_pool == "token":
            R[0] = r_feat
        else:
            rows = slice(0, None) if grid else slice(m.num_prefix_tokens, None)
            n = tokens[rows].shape[0]
            R[rows] = div(tokens[rows] / n * r_feat, tokens[rows].mean(0).expand_as(tokens[rows]))
    R = _norm(m.norm, _flat(rec["norm.in"]), tokens, R)
    absorbed = [0.0] * len(blocks)
    merge_at = _merge_at(m, rec)
    for k in reversed(range(len(blocks))):
        blk, p = blocks[k], f"b{k}."
        heads, attn = blk.attn.num_heads, blk.attn
        post = _post_norm(rec, p)
        x = _flat(rec[p + "x"])
        mid = _flat(rec[p + "mlp.in"] if post else rec[p + "norm2.in"])
        b1, b2 = _flat(rec[p + "drop_path1.out"]), _flat(rec[p + "drop_path2.out"])
        out = mid + b2
        r_mid, r_b2 = div(mid, out) * R, div(b2, out) * R  # residual add: epsilon rule
        # layer-scale, drop-path, dropout: single-input, relevance unchanged
        n2 = (_flat(rec[p + "norm2.in"]), _flat(rec[p + "norm2.out"]))
        if post:  # x + norm2(mlp(x))
            r = _mlp(blk, rec, p, _norm(blk.norm2, *n2, r_b2))
        else:  # x + mlp(norm2(x))
            r = _norm(blk.norm2, *n2, _mlp(blk, rec, p, r_b2))
        r_mid = r_mid + r
        r_x, r_b1 = div(x, mid) * r_mid, div(b1, mid) * r_mid
        n1 = (_flat(rec[p + "norm1.in"]), _flat(rec[p + "norm1.out"]))
        if post:  # x + norm1(attn(x))
            r_b1 = _norm(blk.norm1, *n1, r_b1)
        t = attention_terms(m, blk, rec, p)
        if grid:
            H, W = rec[p + "x"].shape[:2]
            slots = window_slots(blk, H, W)
            n_win, T = t["x_in"].shape[:2]
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
        if p + "norm.in" in rec:  # attention output norm (EVA scale_attn_inner, ViT scale_norm)
            r_o = torch.stack(
                [_norm(attn.norm, rec[p + "norm.in"][w], rec[p + "norm.out"][w], r_o[w]) for w in range(nw)]
            )
        A, v, q, kk = t["A"], t["v"], t["q"], t["k"]
        r_oh = r_o.reshape(nw, -1, heads, v.shape[-1]).transpose(1, 2)
        # O = A V: epsilon rule on the contributions A_ij v_jd, then half to each factor
        contrib = A[..., :, :, None] * v[..., None, :, :]
        share = contrib * div(r_oh, contrib.sum(-2))[..., :, None, :]
        r_a, r_v = share.sum(-1) / 2, share.sum(-3) / 2
        # softmax rule (Proposition 3.1): R_x = x (R_A - A sum_j R_A), x the logits
        logit, zq = t["logit"], t["zq"]
        r_logit = logit * (r_a - A * r_a.sum(-1, keepdim=True))
        absorbed[k] = float(r_a.sum() - r_logit.sum())
        r_z = div(zq, logit) * r_logit  # biases and masks are constants: epsilon rule on the addition
        contrib = (q * t["scale"])[..., :, None, :] * kk[..., None, :, :]  # (i, j, d)
        share = contrib * div(r_z, contrib.sum(-1))[..., None]
        r_q, r_k = share.sum(-2) / 2, share.sum(-3) / 2
        # Swin V2's L2 normalisation of q and k: norm held constant, elementwise: relevance unchanged
        if "rope" in t:  # the rotation: epsilon rule (a linear map)
            npt, parts_q, parts_k = t["rope"]
            r_q = torch.cat([r_q[:, :, :npt], _rope_eps(parts_q, r_q[:, :, npt:])], dim=2)
            r_k = torch.cat([r_k[:, :, :npt], _rope_eps(parts_k, r_k[:, :, npt:])], dim=2)
        if p + "q_norm.in" in rec:
            r_q = _norm(attn.q_norm, rec[p + "q_norm.in"], rec[p + "q_norm.out"], r_q)
            r_k = _norm(attn.k_norm, rec[p + "k_norm.in"], rec[p + "k_norm.out"], r_k)
        r_qkv = [join_heads(r_q[w], r_k[w], r_v[w]) for w in range(nw)]
        r_in = torch.stack([eps_linear(t["x_in"][w], t["W"], t["z_qkv"][w], r_qkv[w]) for w in range(nw)])
        r_att = from_windows(r_in, slots, x.shape[0]) if grid else r_in[0]
        R = r_x + (r_att if post else _norm(blk.norm1, *n1, r_att))
        if k in merge_at:
            s = merge_at[k]
            ds = m.layers[s].downsample
            red_in, red_out = rec[f"merge{s}.reduction.in"], rec[f"merge{s}.reduction.out"]
            nm = (_flat(rec[f"merge{s}.norm.in"]), _flat(rec[f"merge{s}.norm.out"]))
            norm_first = nm[0].shape == _flat(red_in).shape and torch.equal(nm[1], _flat(red_in))
            if not norm_first:  # V2: reduction, then norm
                R = _norm(ds.norm, *nm, R)
            r4 = eps_linear(_flat(red_in), ds.reduction.weight, _flat(red_out), R)
            if norm_first:  # v1: norm, then reduction
                r4 = _norm(ds.norm, *nm, r4)
            R = unmerge(r4.reshape(*red_in.shape[:2], -1), rec[f"merge{s}.in"].shape[:2])
    inputs = float(R.sum())
    embed = rec["embed.out"]
    if grid:
        heat = R.reshape(*embed.shape[:2], -1).sum(-1)
    else:
        # x0 = prefix tokens and embed + position embedding: epsilon rule on that addition
        P = m.num_prefix_tokens
        x0 = x[P:]
        heat = (div(embed.reshape(x0.shape), x0) * R[P:]).sum(-1).reshape(m.patch_embed.grid_size)
    return {"heat": heat, "inputs": inputs, "absorbed": absorbed, "logit": float(logits[c])}
