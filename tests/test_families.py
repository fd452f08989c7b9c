"""DeiT distilled, Swin V2, EVA and BEiT: reference, batching, hygiene, geometry and refusals."""

from __future__ import annotations

import pytest
import torch
from timm.layers import RmsNorm
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.swin_transformer_v2 import SwinTransformerV2

import lnstd
from lnstd.arch import UnsupportedModelError, get_adapter

from .helpers import assert_window_map_exact, images_for, sharpen
from .reference import reference_heatmap

METHODS = ["attention", "rollout", "gae", "lnstd", "gradcam"]


def _realistic(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights where timm's init would make the test vacuous: norm scales of 0 (Swin V2 zeroes
    its post-norms, which switches the attention branch off), zero position-bias tables, and tiny
    heads (EVA's head_init_scale) whose gradients vanish below the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("norm1.bias", "norm2.bias", "relative_position_bias_table")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return sharpen(model.eval())


def make_deit(seed: int = 10) -> VisionTransformerDistilled:
    """Class + distillation token, 4x6 grid."""
    torch.manual_seed(seed)
    m = VisionTransformerDistilled(
        img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7
    )
    return _realistic(m, seed)


def make_swinv2(seed: int = 11, img_size=44, window_size=5) -> SwinTransformerV2:
    """11x11 first stage with window 5: padded and shifted windows, odd-size patch merging."""
    torch.manual_seed(seed)
    m = SwinTransformerV2(
        img_size=img_size,
        patch_size=4,
        window_size=window_size,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=6,
    )
    return _realistic(m, seed)


def make_eva(seed: int = 12) -> Eva:
    """EVA-02 style: rope, SwiGLU with scale norm, layer scale, avg pool + fc_norm; class and one
    register token (rope skips both); dynamic image size."""
    torch.manual_seed(seed)
    m = Eva(
        img_size=(28, 42),
        patch_size=7,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=5,
        mlp_ratio=8 / 3,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 6),
        init_values=0.5,
        num_reg_tokens=1,
        dynamic_img_size=True,
    )
    return _realistic(m, seed)


def make_eva_post(seed: int = 13) -> Eva:
    """Post-norm EVA blocks with RMSNorm, class-token readout."""
    torch.manual_seed(seed)
    m = Eva(
        img_size=(28, 42),
        patch_size=7,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 6),
        use_post_norm=True,
        global_pool="token",
        norm_layer=RmsNorm,
    )
    return _realistic(m, seed)


def make_beit(seed: int = 14) -> Beit:
    """Per-block relative position bias, layer scale, avg pool + fc_norm (BEiT's default)."""
    torch.manual_seed(seed)
    m = Beit(
        img_size=(32, 48),
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=5,
        use_rel_pos_bias=True,
        init_values=0.5,
    )
    return _realistic(m, seed)


def make_beit_token(seed: int = 15) -> Beit:
    """Shared relative position bias, class-token readout."""
    torch.manual_seed(seed)
    m = Beit(
        img_size=(32, 48),
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        use_shared_rel_pos_bias=True,
        global_pool="token",
    )
    return _realistic(m, seed)


MODELS = {
    "deit": make_deit,
    "swinv2": make_swinv2,
    "eva": make_eva,
    "eva_post": make_eva_post,
    "beit": make_beit,
    "beit_token": make_beit_token,
}
# family, prefix tokens, default capture on CUDA (CPU: always unfused), std side of every block
FACTS = {
    "deit": ("deit", 2, "fused", "key"),
    "swinv2": ("swinv2", 0, "unfused", "query"),
    "eva": ("eva", 2, "unfused", "key"),
    "eva_post": ("eva", 1, "unfused", "query"),
    "beit": ("beit", 1, "unfused", "key"),
    "beit_token": ("beit", 1, "unfused", "key"),
}
TOKEN_ARCHS = [a for a in MODELS if a != "swinv2"]


@pytest.mark.parametrize("arch", list(MODELS))
def test_adapter_facts(arch):
    model = MODELS[arch]()
    ad = get_adapter(model)
    family, prefix, capture, side = FACTS[arch]
    assert (ad.family, ad.num_prefix) == (family, prefix)
    ex = lnstd.Explainer(model, ["gae"])
    assert ex.capture_for(torch.device("cuda")) == capture
    assert ex.capture == ex.capture_for(torch.device("cpu")) == "unfused"
    assert {b.std_side for b in ad.blocks} == {side}


@pytest.mark.parametrize("arch", list(MODELS))
def test_batched_equals_per_image(arch):
    model = MODELS[arch]()
    x = images_for(model, batch=4)
    batched = lnstd.Explainer(model, METHODS)(x).heatmaps
    single = [lnstd.Explainer(model, METHODS)(x[i : i + 1]).heatmaps for i in range(4)]
    for m in METHODS:
        assert batched[m].dtype == torch.float32
        assert batched[m].abs().sum() > 0, m
        torch.testing.assert_close(batched[m], torch.cat([s[m] for s in single]), atol=1e-5, rtol=1e-5)


def _ref_cases():
    cases = []
    for arch in MODELS:
        captures = [None, "unfused"] if FACTS[arch][2] == "fused" else [None]
        opts = [("attention", {}), ("rollout", {}), ("gae", {}), ("gradcam", {})]
        opts += [("lnstd", {}), ("lnstd", {"std": "multiply", "normalize": "row"})]
        opts += [("lnstd", {"std": "inverse", "normalize": "none"})]
        if arch == "swinv2":
            opts += [("lnstd", {"blocks": "all"}), ("gae", {"blocks": 2}), ("rollout", {"blocks": 2})]
        cases += [(arch, method, o, c) for method, o in opts for c in captures]
    return cases


@pytest.mark.parametrize(("arch", "method", "opts", "capture"), _ref_cases())
def test_fast_path_equals_reference(arch, method, opts, capture):
    model = MODELS[arch]()
    x = images_for(model, batch=2, seed=3)
    fast = lnstd.explain(model, x, method=method, capture=capture, **opts)
    for i in range(2):
        ref = reference_heatmap(model, x[i : i + 1], method, **opts).float()
        assert fast[i].shape == ref.shape
        # maps of small magnitude (Grad-CAM ~1e-3) are compared as strictly as those of order one
        scale = ref.abs().max().clamp(max=1.0)
        assert scale > 0
        torch.testing.assert_close(fast[i] / scale, ref / scale, atol=1e-5, rtol=1e-4)


def test_swinv2_lnstd_default_and_resolution():
    model = make_swinv2()
    x = images_for(model, batch=1)
    assert lnstd.Explainer(model, ["lnstd"]).options["lnstd"]["blocks"] == 2  # as Swin v1
    assert lnstd.explain(model, x, method="lnstd").shape == (1, 6, 6)  # last stage
    assert lnstd.explain(model, x, method="gae").shape == (1, 11, 11)
    gae = lnstd.explain(model, x, method="gae", blocks=2)
    assert torch.equal(gae, lnstd.explain(model, x, method="lnstd", std="none", normalize="none"))


# --- hygiene ---------------------------------------------------------------------------------------


def _state(model):
    ad = get_adapter(model)
    return {
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        },
        "fused": [getattr(b.attn, "fused_attn", None) for b in ad.blocks],
        "checkpointing": {
            n: m.grad_checkpointing for n, m in model.named_modules() if hasattr(m, "grad_checkpointing")
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _unusual(model):
    """A state that differs from the defaults, so restoring it is a real check."""
    for k, b in enumerate(get_adapter(model).blocks):
        if hasattr(b.attn, "fused_attn"):
            b.attn.fused_attn = k % 2 == 0
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = True
    for k, p in enumerate(model.parameters()):
        p.requires_grad_(k % 3 != 0)
    model.head.train()
    model.head.register_forward_hook(lambda m, a, o: None)  # a user's own hook must survive
    return model


@pytest.mark.parametrize("arch", ["deit", "swinv2", "eva", "beit"])
def test_model_restored_after_success_and_after_exceptions(arch):
    model = _unusual(MODELS[arch]())
    before = _state(model)
    lnstd.Explainer(model, METHODS)(images_for(model))
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())

    def boom(m, a, o):
        raise RuntimeError("boom")

    h = model.head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):  # inside the forward pass
        lnstd.explain(model, images_for(model), method="lnstd")
    h.remove()
    assert _state(model) == before
    with pytest.raises(ValueError, match="out of range"):  # after the forward pass
        lnstd.explain(model, images_for(model), method="gae", target=99)
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())


# --- geometry, by brute force on the real timm modules ------------------------------------------------


def test_swinv2_window_map_by_brute_force_on_real_block():
    """Perturbing one input token of a real timm Swin V2 block changes exactly the outputs of its
    (shifted) window."""
    assert_window_map_exact(make_swinv2())


def _first_block_input(model, ad, x):
    seen = {}
    h = ad.blocks[0].block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen["x"]


@pytest.mark.parametrize("arch", list(MODELS))
def test_each_image_patch_lands_on_its_grid_cell(arch):
    """Perturbing the pixels of patch (r, c) changes one token of the first block's input, and the
    adapter's grid puts that token at (r, c): prefix count, patch order and grid are right."""
    model = MODELS[arch]()
    ad = get_adapter(model)
    x = images_for(model, batch=1)
    ad.set_input_size(tuple(x.shape[-2:]))
    ph, pw = model.patch_embed.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    base = _first_block_input(model, ad, x)
    for r in range(gh):
        for c in range(gw):
            x2 = x.clone()
            x2[..., r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] += torch.randn(3, ph, pw)
            diff = (_first_block_input(model, ad, x2) - base).abs().amax(-1).reshape(1, -1)
            changed = (diff[0] > 1e-6).nonzero().flatten().tolist()
            assert len(changed) == 1, (r, c, changed)
            onehot = torch.zeros_like(diff)
            onehot[0, changed[0]] = 1.0
            grid = ad.to_grid(onehot, base.shape)
            assert grid.shape == (1, gh, gw)
            assert grid[0, r, c] == 1 and grid.sum() == 1


@pytest.mark.parametrize("arch", list(MODELS))
def test_readout_reads_exactly_the_tokens_the_head_reads(arch):
    """Perturbing token t of the last block's output changes the logits iff the readout vector is
    non-zero at t (DeiT: class and distillation tokens; avg pools: the patch tokens; Swin V2: all)."""
    model = MODELS[arch]()
    ad = get_adapter(model)
    x = images_for(model, batch=1)
    last = ad.blocks[-1].block
    shape = {}
    h = last.register_forward_hook(lambda m, a, o: shape.__setitem__("s", o.shape))
    with torch.no_grad():
        base = model(x)
    h.remove()
    n = shape["s"][1] if len(shape["s"]) == 3 else shape["s"][1] * shape["s"][2]
    delta = torch.randn(shape["s"][-1])
    read = []
    for t in range(n):

        def bump(m, a, o, t=t):
            o = o.clone()
            o.view(1, -1, o.shape[-1])[0, t] += delta
            return o

        h = last.register_forward_hook(bump)
        with torch.no_grad():
            read.append(bool((model(x) - base).abs().max() > 1e-6))
        h.remove()
    start = ad.readout_start(shape["s"], 1, x.device)[0]
    assert read == (start != 0).tolist()
    if arch == "deit":
        assert start[:2].tolist() == [0.5, 0.5]  # the heads' logits are averaged


@pytest.mark.parametrize("arch", ["deit", "eva", "beit"])
def test_non_square_grid_comes_from_the_model(arch):
    model = MODELS[arch]()
    x = images_for(model, batch=2)
    h, w = model.patch_embed.grid_size
    assert h != w
    assert lnstd.explain(model, x, method="lnstd").shape == (2, h, w)


def test_eva_dynamic_size_and_swinv2_non_square():
    eva = make_eva()  # dynamic_img_size: grid from the batch, via the patch embedding
    assert lnstd.explain(eva, torch.randn(2, 3, 28, 56), method="gae").shape == (2, 4, 8)
    v2 = make_swinv2(img_size=(32, 48), window_size=4)
    heat = lnstd.explain(v2, images_for(v2, batch=2), method="gae")
    assert heat.shape == (2, 8, 12) and heat.abs().sum() > 0


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "cls"),
    [
        ("deit", "VisionTransformerDistilled"),
        ("swinv2", "SwinTransformerV2"),
        ("eva", "Eva"),
        ("beit", "Beit"),
    ],
)
def test_what_cannot_apply_raises_naming_the_class(arch, cls):
    model = MODELS[arch]()
    if arch != "deit":  # no fused kernel (Swin V2) or not exact from module outputs (rope, q bias)
        with pytest.raises(UnsupportedModelError, match=rf"capture='fused' is not available for {cls}\b"):
            lnstd.Explainer(model, ["gae"], capture="fused")


def test_unsupported_variants_name_the_class():
    torch.manual_seed(0)
    tiny = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(UnsupportedModelError, match=r"Eva with global_pool='map'"):
        get_adapter(Eva(img_size=16, global_pool="map", **tiny))
    with pytest.raises(UnsupportedModelError, match=r"Beit with global_pool=''"):
        get_adapter(Beit(img_size=16, global_pool="", **tiny))
    v2 = SwinTransformerV2(
        img_size=16, window_size=2, embed_dim=8, depths=(1,), num_heads=(2,), global_pool=""
    )
    with pytest.raises(UnsupportedModelError, match=r"SwinTransformerV2 with global_pool=''"):
        get_adapter(v2)
