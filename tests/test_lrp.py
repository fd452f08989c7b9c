"""transformer_attribution and attnlrp: float64 reference, conservation, batching, hygiene, sharing."""

from __future__ import annotations

import pytest
import torch

import lnstd
from lnstd.arch import get_adapter

from .helpers import images_for, make_swin, make_vit_avg_reg, make_vit_token, sharpen
from .reference import reference_heatmap
from .reference_lrp import reference_attnlrp, ta_attention_relevance
from .test_hygiene import _state, _unusual

LRP = ["transformer_attribution", "attnlrp"]
EXISTING = ["attention", "rollout", "gae", "lnstd", "gradcam"]


def offsets(model, seed=0, scale=0.1):
    """Random biases, LayerNorm gains and offsets, relative position biases: timm initialises them to
    constants (mostly 0), which would leave the rules' handling of offsets untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight") and p.ndim == 1:  # norm gains
                p.copy_(1 + torch.randn(p.shape, generator=g) * scale)
    return model


def boost(model, factor=1e5):
    """Scale the logits, so that maps of random models are well above absolute tolerances (the
    comparisons with the reference are relative to the spread and need no boost)."""
    with torch.no_grad():
        model.get_classifier().weight.mul_(factor)
    return model


MODELS = {  # two blocks; Swin: two stages of two (shifts, padded windows, odd-size merging)
    "vit_token": lambda: offsets(sharpen(make_vit_token(depth=2))),
    "vit_avg_reg_qknorm_layerscale": lambda: offsets(sharpen(make_vit_avg_reg(depth=2))),
    "swin": lambda: offsets(sharpen(make_swin())),
}


def assert_matches(fast, ref, rel=2e-3):
    """Equal within ``rel`` of the reference map's spread (plus float32 rounding of its magnitude).

    transformer_attribution's pooled maps agree to 4e-6 .. 5e-4 of the spread, not better: its pooling
    rule divides by per-channel token means and its residual rule by per-image sums, both of which can
    be near 0, so 1e-7 rounding in the forward activations grows (docs/lrp.md, "Numerics"). In float64
    the same code agrees with the reference to 1e-12 (test_lrp_arithmetic_is_exact_in_float64).
    """
    ref = ref.detach().to(fast.dtype)
    spread = float(ref.max() - ref.min())
    assert spread > 1e-3 * float(ref.abs().max()), "the map is flat: the comparison would prove nothing"
    torch.testing.assert_close(fast, ref, rtol=0, atol=rel * spread + 2e-7 * float(ref.abs().max()))


def _check_against_reference(model, x, rel):
    out = lnstd.Explainer(model, [*LRP, "lnstd"], **{"lnstd.base": "transformer_attribution"})(x)
    for i in range(x.shape[0]):
        image, t = x[i : i + 1], int(out.targets[i])
        assert_matches(out.heatmaps["attnlrp"][i], reference_attnlrp(model, image, t)["heat"], rel)
        r_a = ta_attention_relevance(model, image, t)
        ta = reference_heatmap(model, image, "gae", target=t, relevance=r_a)  # gae's chain on G ⊙ R_A
        assert_matches(out.heatmaps["transformer_attribution"][i], ta, rel)
        ln = reference_heatmap(model, image, "lnstd", target=t, relevance=r_a)
        assert_matches(out.heatmaps["lnstd"][i], ln, rel)
    assert not torch.allclose(ln, reference_heatmap(model, image, "lnstd", target=t))  # the base matters


@pytest.mark.parametrize("arch", list(MODELS))
def test_lrp_methods_equal_the_float64_reference(arch):
    model = MODELS[arch]()  # no rescaled logits: pooled chains keep their signal in float32
    _check_against_reference(model, images_for(model, batch=2, seed=3), rel=2e-3)


@pytest.mark.parametrize("arch", list(MODELS))
def test_lrp_arithmetic_is_exact_in_float64(arch, monkeypatch):
    """The same code with float64 activations and arithmetic (the library's ``.float()`` made float64
    for this test): rule for rule the reference's values, to 1e-12 of the spread."""
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = MODELS[arch]().double()
        _check_against_reference(model, images_for(model, batch=1, seed=3).double(), rel=1e-12)
    finally:
        torch.set_default_dtype(default)


def test_attnlrp_gated_mlp_equals_the_reference():
    from timm.layers import SwiGLU

    model = offsets(sharpen(make_vit_token(depth=2, mlp_layer=SwiGLU)))
    x = images_for(model, batch=2, seed=4)
    out = lnstd.Explainer(model, ["attnlrp"])(x)
    for i in range(2):
        ref = reference_attnlrp(model, x[i : i + 1], int(out.targets[i]))["heat"]
        assert_matches(out.heatmaps["attnlrp"][i], ref)
    with pytest.raises(lnstd.UnsupportedModelError, match="gated MLP"):
        lnstd.Explainer(model, ["transformer_attribution"])


def zero_offsets(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "relative_position_bias_table" in name or "pos_embed" in name:
                p.zero_()
    return model


def watch_attnlrp(model, x, methods):
    """``methods`` (attnlrp among them) on ``x`` with hooks that keep the first block's input,
    every block's A, and their gradients in attnlrp's modified backward pass (float64)."""
    blocks = get_adapter(model).blocks
    for b in blocks:
        b.attn.fused_attn = False  # so that A is a tensor the hooks can watch
    seen, handles = {}, []

    def watch(key):
        def hook(_m, args, out=None):
            t = args[0] if out is None else out
            if t.requires_grad:  # not the no-grad forward that finds the targets
                seen[key] = t.detach().double()
                t.register_hook(lambda g: seen.__setitem__(key + ".grad", g.detach().double()))

        return hook

    handles.append(blocks[0].block.register_forward_pre_hook(watch("x0")))
    for b in blocks:
        handles.append(b.attn_drop.register_forward_hook(lambda m, a, o, k=b.index: watch(f"A{k}")(m, a, o)))
    try:
        out = lnstd.Explainer(model, methods)(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen, blocks


@pytest.mark.parametrize("arch", list(MODELS))
def test_attnlrp_conserves_all_but_what_the_softmax_rule_absorbs(arch):
    """With every additive offset zeroed (biases, LayerNorm offsets, position embeddings, relative
    position biases), every rule but the softmax's passes on exactly the relevance it receives: the
    relevance of the first block's input tokens equals the target logit minus what each softmax rule
    keeps (sum R_A - sum R_logits, measured here from A and the gradient reaching it)."""
    model = zero_offsets(MODELS[arch]())
    x = images_for(model, batch=2, seed=5)
    out, seen, blocks = watch_attnlrp(model, x, ["attnlrp"])
    logit = out.logits.double().gather(1, out.targets[:, None])[:, 0]
    inputs = (seen["x0"] * seen["x0.grad"]).reshape(2, -1).sum(1)
    absorbed = torch.zeros(2, dtype=torch.float64)
    for b in blocks:
        a, g = seen[f"A{b.index}"], seen[f"A{b.index}.grad"]
        r_a = a * g / 2  # uniform rule: A gets half of A V's relevance
        # softmax rule R_x = x (R_A - A sum R_A) with x = log A + const per row (the const cancels)
        r_x = torch.where(a > 0, a.log(), 0) * (r_a - a * r_a.sum(-1, keepdim=True))
        absorbed += (r_a - r_x).reshape(2, -1).sum(1)
    torch.testing.assert_close(inputs + absorbed, logit, rtol=1e-5, atol=1e-6)
    assert (absorbed.abs() > 1e-3 * logit.abs()).all()  # the softmax really does keep some
    heat_sum = out.heatmaps["attnlrp"].double().reshape(2, -1).sum(1)
    prefix = get_adapter(model).num_prefix
    patch_rows = (seen["x0"] * seen["x0.grad"])[:, prefix:].reshape(2, -1).sum(1)
    torch.testing.assert_close(heat_sum, patch_rows, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", list(MODELS))
def test_one_image_equals_its_row_of_the_batch(arch):
    model = MODELS[arch]()
    x = images_for(model, batch=2, seed=6)
    target = torch.tensor([2, 1])
    opts = {"lnstd.base": "transformer_attribution"}
    batched = lnstd.Explainer(model, [*LRP, "lnstd"], **opts)(x, target).heatmaps
    for i in range(2):
        single = lnstd.Explainer(model, [*LRP, "lnstd"], **opts)(x[i : i + 1], target[i : i + 1]).heatmaps
        for name, heat in single.items():
            assert batched[name][i].abs().sum() > 0
            torch.testing.assert_close(batched[name][i : i + 1], heat, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_relevance_walk_is_the_same_for_both_captures(arch):
    model = boost(MODELS[arch]())
    x = images_for(model, batch=2, seed=7)
    fused = lnstd.explain(model, x, "transformer_attribution", capture="fused")
    unfused = lnstd.explain(model, x, "transformer_attribution", capture="unfused")
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_existing_methods_are_unchanged_by_the_lrp_methods():
    model = sharpen(make_swin())
    x = images_for(model, batch=2, seed=8)
    alone = lnstd.Explainer(model, EXISTING)(x)
    together = lnstd.Explainer(model, [*EXISTING, *LRP])(x)
    for name in EXISTING:
        assert torch.equal(alone.heatmaps[name], together.heatmaps[name]), name
    for name in LRP:
        torch.testing.assert_close(together.heatmaps[name], lnstd.explain(model, x, name))
    torch.testing.assert_close(alone.logits, together.logits)


def test_lnstd_base_option():
    model = MODELS["vit_token"]()
    x = images_for(model, batch=2)
    ex = lnstd.Explainer(model, ["lnstd", "transformer_attribution"], base="transformer_attribution")
    assert ex.options["lnstd"]["base"] == "transformer_attribution"
    assert lnstd.Explainer(model, ["lnstd"]).options["lnstd"]["base"] == "gae"  # the default
    # without the std weighting and normalisation, lnstd on TA's base is TA itself
    plain = lnstd.explain(model, x, "lnstd", base="transformer_attribution", std="none", normalize="none")
    assert torch.equal(plain, lnstd.explain(model, x, "transformer_attribution"))
    with pytest.raises(ValueError, match="base must be one of"):
        lnstd.Explainer(model, ["lnstd"], base="rollout")
    with pytest.raises(TypeError, match="unknown option 'base' for attnlrp"):
        lnstd.Explainer(model, ["attnlrp"], base="gae")
    ta2 = lnstd.explain(model, x, "transformer_attribution", blocks=1)
    assert not torch.allclose(ta2, lnstd.explain(model, x, "transformer_attribution"))


def assert_left_as_found(model, methods, state, **options) -> None:
    """The model is left as found after the LRP methods succeed, after they fail in the shared pass
    and after attnlrp fails inside its own pass; no parameter gets a gradient."""
    before = state(model)
    lnstd.Explainer(model, methods, **options)(images_for(model))
    assert state(model) == before
    assert all(p.grad is None for p in model.parameters())

    def boom(m, a, o):
        raise RuntimeError("boom")

    for name in methods:
        h = model.head.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            lnstd.Explainer(model, [name])(images_for(model))
        h.remove()
        assert state(model) == before

    def boom_with_grad(m, a, o):  # spares the no-grad forward that finds the targets
        if torch.is_grad_enabled():
            raise RuntimeError("boom")

    fc2 = get_adapter(model).blocks[-1].lrp.fc2
    h = fc2.register_forward_hook(boom_with_grad)  # fails inside attnlrp's own pass, hooks in place
    with pytest.raises(RuntimeError, match="boom"):
        lnstd.explain(model, images_for(model), "attnlrp", target=0)
    h.remove()
    assert state(model) == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make", [make_vit_token, make_swin])
def test_model_left_as_found(make):
    assert_left_as_found(_unusual(offsets(make())), LRP, _state)


def test_autocast_keeps_float32_relevance():
    model = MODELS["vit_token"]()
    x = images_for(model)
    for name in LRP:
        ref = lnstd.explain(model, x, name)
        low = lnstd.explain(model, x, name, precision="bf16")
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.9


def test_unsupported_structure_is_named():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    for name in LRP:
        with pytest.raises(lnstd.UnsupportedModelError, match=f"{name} cannot explain.*head"):
            lnstd.Explainer(model, [name])
