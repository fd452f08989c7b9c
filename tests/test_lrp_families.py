"""transformer_attribution and attnlrp on DeiT distilled, Swin V2, EVA and BEiT: float64 reference,
batching, hygiene, and the clear error where a rule is missing (docs/lrp.md, "Families")."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva

import lnstd

from .helpers import images_for
from .reference import reference_heatmap
from .reference_lrp import reference_attnlrp, ta_attention_relevance
from .test_families import _realistic, _state, _unusual, make_beit_token, make_eva_post, make_swinv2
from .test_lrp import assert_left_as_found, assert_matches, offsets

TA = ["transformer_attribution", "lnstd"]  # lnstd on the TA base (option below)
BOTH = [*TA, "attnlrp"]
TA_BASE = {"lnstd.base": "transformer_attribution"}


def _lrp_ready(model, seed=0):
    """Random biases (q and v biases, cpb MLP, relative position tables), norm gains and logit scales:
    timm initialises most of them to constants, which would leave their rules untested."""
    offsets(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.3 * torch.randn(p.shape, generator=g))
    return model


def make_deit2(seed=20):
    torch.manual_seed(seed)
    m = VisionTransformerDistilled(
        img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7
    )
    return _lrp_ready(_realistic(m, seed))


def make_beit2(seed=21):
    """Per-block relative position bias, layer scale, q/v biases, avg pool + fc_norm."""
    torch.manual_seed(seed)
    m = Beit(
        img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        use_rel_pos_bias=True, init_values=0.5,
    )  # fmt: skip
    return _lrp_ready(_realistic(m, seed))


def _eva(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        img_size=(28, 42), patch_size=7, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        use_rot_pos_emb=True, ref_feat_shape=(4, 6),
    )  # fmt: skip
    cfg.update(kw)
    return _lrp_ready(_realistic(Eva(**cfg), seed))


MODELS = {
    "deit": make_deit2,
    "beit": make_beit2,
    "beit_token_shared_bias": lambda: _lrp_ready(make_beit_token()),
    # EVA (v1 MLP) with rope on the patch tokens, a register token, layer scale, avg pool + fc_norm,
    # dynamic image size (grid and rope from the batch)
    "eva_mlp_rope": lambda: _eva(22, init_values=0.5, num_reg_tokens=1, dynamic_img_size=True),
    # EVA-02: SwiGLU with its norm, separate q/k/v projections, rope, layer scale, avg pool
    "eva02_swiglu": lambda: _eva(
        23, mlp_ratio=8 / 3, swiglu_mlp=True, scale_mlp=True, qkv_fused=False, init_values=0.5
    ),
    # packed SwiGLU (GluMlp), rotate-half rope layout, qk-norm, attention output norm, class token
    "eva_glu_half": lambda: _eva(
        24, swiglu_mlp=True, rope_rotate_half=True, qk_norm=True, scale_attn_inner=True, global_pool="token"
    ),
    "eva_post_rmsnorm": lambda: _lrp_ready(make_eva_post()),
    "swinv2": lambda: _lrp_ready(make_swinv2()),
}
METHODS = {  # the methods each model supports; the others must raise (test_what_cannot_apply_raises)
    "deit": BOTH,
    "beit": BOTH,
    "beit_token_shared_bias": BOTH,
    "eva_mlp_rope": BOTH,
    "eva02_swiglu": ["attnlrp"],
    "eva_glu_half": ["attnlrp"],
    "eva_post_rmsnorm": BOTH,
    "swinv2": BOTH,
}


def _model(arch):
    return MODELS[arch]()  # pooled models too: no rescaled logits needed (docs/lrp.md, "Numerics")


def _check_against_reference(model, x, arch, rel, capture=None):
    methods = METHODS[arch]
    out = lnstd.Explainer(model, methods, capture=capture, **(TA_BASE if "lnstd" in methods else {}))(x)
    for i in range(x.shape[0]):
        image, t = x[i : i + 1], int(out.targets[i])
        if "attnlrp" in methods:
            assert_matches(out.heatmaps["attnlrp"][i], reference_attnlrp(model, image, t)["heat"], rel)
        if "transformer_attribution" in methods:
            r_a = ta_attention_relevance(model, image, t)
            ta = reference_heatmap(model, image, "gae", target=t, relevance=r_a)  # gae's chain on G ⊙ R_A
            assert_matches(out.heatmaps["transformer_attribution"][i], ta, rel)
            ln = reference_heatmap(model, image, "lnstd", target=t, relevance=r_a)
            assert_matches(out.heatmaps["lnstd"][i], ln, rel)


CASES = [(a, None) for a in MODELS] + [("deit", "unfused")]  # DeiT: fused by default, both captures


@pytest.mark.parametrize(("arch", "capture"), CASES)
def test_lrp_methods_equal_the_float64_reference(arch, capture):
    model = _model(arch)
    _check_against_reference(model, images_for(model, batch=2, seed=3), arch, rel=2e-3, capture=capture)


@pytest.mark.parametrize("arch", list(MODELS))
def test_lrp_arithmetic_is_exact_in_float64(arch, monkeypatch):
    """The same code in float64 (the library's ``.float()`` made float64 for this test): rule for rule
    the reference's values, to 1e-12 of the spread."""
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = _model(arch).double()
        _check_against_reference(model, images_for(model, batch=1, seed=3).double(), arch, rel=1e-12)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("arch", list(MODELS))
def test_one_image_equals_its_row_of_the_batch(arch):
    model = MODELS[arch]()
    x = images_for(model, batch=2, seed=6)
    target = torch.tensor([2, 1])
    methods = METHODS[arch]
    opts = TA_BASE if "lnstd" in methods else {}
    batched = lnstd.Explainer(model, methods, **opts)(x, target).heatmaps
    for i in range(2):
        single = lnstd.Explainer(model, methods, **opts)(x[i : i + 1], target[i : i + 1]).heatmaps
        for name, heat in single.items():
            assert batched[name][i].abs().sum() > 0
            torch.testing.assert_close(batched[name][i : i + 1], heat, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["deit", "beit", "eva02_swiglu", "eva_post_rmsnorm", "swinv2"])
def test_model_left_as_found(arch):
    model = _unusual(MODELS[arch]())
    methods = METHODS[arch]
    assert_left_as_found(model, methods, _state, **(TA_BASE if "lnstd" in methods else {}))
    # attnlrp's F.normalize rule (Swin V2) is gone with its pass: the plain gradient of normalize(q)
    # is orthogonal to q again (held norm: q / |q|)
    q = torch.randn(5, requires_grad=True)
    (torch.nn.functional.normalize(q, dim=0) @ q.detach()).backward()
    assert q.grad.abs().max() < 1e-6


@pytest.mark.parametrize("arch", [a for a in MODELS if "transformer_attribution" not in METHODS[a]])
def test_what_cannot_apply_raises(arch):
    model = MODELS[arch]()
    for name, opts in (
        ("transformer_attribution", {}),
        ("lnstd with base='transformer_attribution'", TA_BASE),
    ):
        with pytest.raises(
            lnstd.UnsupportedModelError, match=rf"^{name} cannot explain Eva: block 0 has a gated MLP"
        ):
            lnstd.Explainer(model, [name.split()[0]], **opts)
    lnstd.Explainer(model, ["gae", "lnstd", "attnlrp"])  # what applies still does


def test_unsupported_attention_variants_are_named():
    gated = _eva(25)  # EvaAttention(gated=True): timm's Eva does not expose it, its blocks do
    gated.blocks[0].attn.gate = torch.nn.Linear(32, 32)
    for name in ("transformer_attribution", "attnlrp"):
        with pytest.raises(lnstd.UnsupportedModelError, match=rf"{name} cannot explain Eva: block 0 .*gated"):
            lnstd.Explainer(gated, [name])
    rope = _eva(26, attn_type="rope")
    with pytest.raises(lnstd.UnsupportedModelError, match="attnlrp cannot explain Eva: .*AttentionRope"):
        lnstd.Explainer(rope, ["attnlrp"])
    lnstd.Explainer(rope, ["gae"])  # the chain methods do not need the LRP rules


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # timm's RmsNorm, bf16
@pytest.mark.parametrize("arch", ["eva_post_rmsnorm", "swinv2"])
def test_autocast_keeps_float32_relevance(arch):
    """bf16 forward: rotation matrices and recomputed q, k, v stay float32, the F.normalize rule works
    under autocast. (Pooled transformer_attribution maps are the fragile case under bf16, docs/lrp.md
    "Numerics": on the avg-pool EVA and BEiT test models their correlation with the float32 map drops
    to about 0.5 for some images, as on Swin v1 to 0.86; the rope model here reads the class token.)"""
    model = MODELS[arch]()
    x = images_for(model, batch=2)
    for name in ("transformer_attribution", "attnlrp"):
        ref = lnstd.explain(model, x, name)
        low = lnstd.explain(model, x, name, precision="bf16")
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.9, name
