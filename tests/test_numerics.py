"""Figures you can publish: pooled chains in float32 without rescaling the model, bf16 maps, minmax's
rounding threshold, the completeness figure, the capture default per device and subclassed timm blocks."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block

import lnstd
from lnstd.arch import get_adapter
from lnstd.relevance import ChainRunner

from .helpers import images_for, make_swin, make_vit_avg_reg, make_vit_token, sharpen
from .reference import reference_heatmap
from .reference_lrp import ta_attention_relevance
from .test_lrp import offsets, watch_attnlrp, zero_offsets
from .test_lrp_families import _eva, make_beit2

ALL = ["attention", "rollout", "gae", "lnstd", "gradcam", "transformer_attribution", "attnlrp"]
CHAINS = ["attention", "rollout", "gae", "lnstd"]
POOLED = {  # random weights, no rescaled head: the chains' off-identity parts are ~1e-7 of the identity's
    "vit_avg_reg": lambda: offsets(sharpen(make_vit_avg_reg(depth=2))),
    "swin": lambda: offsets(sharpen(make_swin())),
    "beit": make_beit2,
    "eva": lambda: _eva(22, init_values=0.5, num_reg_tokens=1, dynamic_img_size=True),
}


def assert_within_spread(fast: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """``|fast - ref| <= rel * spread(ref)`` everywhere, on a map that is not flat."""
    ref, fast = ref.detach().double(), fast.detach().double()
    spread = float(ref.max() - ref.min())
    assert spread > 1e-3 * float(ref.abs().max()), "the map is flat: the comparison would prove nothing"
    err = float((fast - ref).abs().max())
    assert err <= rel * spread, f"off by {err / spread:.2e} of the spread"


@pytest.mark.parametrize("arch", list(POOLED))
def test_pooled_float32_maps_equal_the_float64_reference(arch, monkeypatch):
    """Every chain method's pooled float32 map is the float64 reference's to 1e-5 of its spread.
    ``transformer_attribution``: its chain on the walk's own R_A to 1e-5; the whole method (the walk
    from a float64 forward) to 2e-3, which is the walk's sensitivity to float32 activations (docs/lrp.md)."""
    model = POOLED[arch]()
    x = images_for(model, batch=2, seed=3)
    walk: dict[int, torch.Tensor] = {}
    feed = ChainRunner.feed

    def keep(self, view):
        feed(self, view)
        walk[view.index] = view.attention_relevance

    monkeypatch.setattr(ChainRunner, "feed", keep)
    out = lnstd.Explainer(model, [*CHAINS, "transformer_attribution"])(x)
    for i in range(2):
        image, t = x[i : i + 1], int(out.targets[i])
        for m in CHAINS:
            assert_within_spread(out.heatmaps[m][i], reference_heatmap(model, image, m, target=t), 1e-5)
        own = [walk[k].reshape(2, -1, *walk[k].shape[1:])[i] for k in sorted(walk)]
        ta = out.heatmaps["transformer_attribution"][i]
        assert_within_spread(ta, reference_heatmap(model, image, "gae", target=t, relevance=own), 1e-5)
        r_a = ta_attention_relevance(model, image, t)
        assert_within_spread(ta, reference_heatmap(model, image, "gae", target=t, relevance=r_a), 2e-3)


def test_minmax_stretches_what_float32_resolves():
    """A spread of 6 float32 units in the last place is signal; bilinear rounding of a constant is not."""
    eps = torch.finfo(torch.float32).eps
    heat = torch.ones(2, 3, 4)
    heat[0, 1, 2] += 6 * eps  # representable: 1 + 6 eps
    mm = lnstd.minmax(heat)
    assert mm[0, 1, 2] == 1 and mm[0].sum() == 1 and torch.equal(mm[1], torch.zeros(3, 4))
    up = lnstd.upsample(torch.full((2, 7, 7), 0.3), (64, 64))
    assert up.max() > up.min()  # the upsampling's rounding ...
    assert torch.equal(lnstd.minmax(up), torch.zeros_like(up))  # ... is not stretched


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def _bf16_agrees(model: torch.nn.Module, x: torch.Tensor) -> None:
    full = lnstd.Explainer(model, ALL)(x)
    low = lnstd.Explainer(model, ALL, precision="bf16")(x, full.targets)
    for m in ALL:
        for i in range(x.shape[0]):
            assert low.heatmaps[m].dtype == torch.float32
            assert _corr(full.heatmaps[m][i], low.heatmaps[m][i]) >= 0.99, (m, i)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_bf16_maps_follow_fp32_on_the_trained_toy_checkpoints(arch):
    from lnstd.data.toy import toy_batch

    model = lnstd.load_model(None, checkpoint=f"lnstd/checkpoints/toy_{arch}.safetensors")
    images, _, _ = toy_batch(2, 5)
    mean, std = (torch.tensor(model.pretrained_cfg[k])[:, None, None] for k in ("mean", "std"))
    _bf16_agrees(model, (torch.tensor(images).permute(0, 3, 1, 2).float() / 255 - mean) / std)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_bf16_maps_follow_fp32_on_random_weight_vit_s16_and_swin_t(name):
    """CPU autocast, one image at the native 224 px (about a minute together on two cores)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    _bf16_agrees(model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("make", [make_vit_token, make_vit_avg_reg, make_swin])
def test_attnlrp_completeness_is_the_conservation_by_hand(make):
    """With every offset zeroed the rules pass on all the logit but what the softmax rules keep and
    what stays on the class and register tokens, so by hand:
    completeness = (y_c - sum_b (sum R_A_b - sum R_logits_b) - R(prefix tokens)) / y_c."""
    model = zero_offsets(sharpen(make()))
    x = images_for(model, batch=2, seed=5)
    out, seen, blocks = watch_attnlrp(model, x, ["attnlrp", "gae"])
    logit = out.logits.double().gather(1, out.targets[:, None])[:, 0]
    kept = torch.zeros(2, dtype=torch.float64)
    for b in blocks:
        a, g = seen[f"A{b.index}"], seen[f"A{b.index}.grad"]
        r_a = a * g / 2  # uniform rule: A gets half of A V's relevance
        r_x = torch.where(a > 0, a.log(), 0) * (r_a - a * r_a.sum(-1, keepdim=True))  # softmax rule
        kept += (r_a - r_x).reshape(2, -1).sum(1)
    prefix = get_adapter(model).num_prefix
    on_prefix = (seen["x0"] * seen["x0.grad"])[:, :prefix].reshape(2, -1).sum(1)
    by_hand = (logit - kept - on_prefix) / logit
    assert set(out.completeness) == {"attnlrp"}  # gae defines none
    torch.testing.assert_close(out.completeness["attnlrp"].double(), by_hand, rtol=1e-4, atol=1e-5)
    assert ((by_hand - 1).abs() > 1e-3).all()  # the softmax rules really keep some


@pytest.mark.parametrize("make", [make_vit_token, make_vit_avg_reg, make_swin])
def test_transformer_attribution_completeness_equals_the_reference_walk(make):
    """The share of the walk's relevance (it starts at 1) on the patch tokens of the first block's
    input, from the float64 reference walk. Its rules conserve (offsets take no part), so with no
    prefix tokens (Swin) it is 1 less what falls on outputs without a positive contribution."""
    model = zero_offsets(sharpen(make()))
    x = images_for(model, batch=2, seed=6)
    out = lnstd.Explainer(model, ["transformer_attribution"])(x)
    prefix = get_adapter(model).num_prefix
    for i in range(2):
        _, r_in = ta_attention_relevance(model, x[i : i + 1], int(out.targets[i]), with_input=True)
        expected = float(r_in[prefix:].sum())
        assert float(out.completeness["transformer_attribution"][i]) == pytest.approx(expected, abs=1e-4)
        if prefix == 0:
            assert 0.99 < expected <= 1 + 1e-6


def test_capture_default_follows_the_device():
    """CPU: unfused (no flash kernel; benchmarks/README.md); CUDA: fused where it is exact."""
    model = sharpen(make_vit_token())
    ex = lnstd.Explainer(model, ["gae"])
    assert ex.capture == ex.capture_for(torch.device("cpu")) == "unfused"
    assert ex.capture_for(torch.device("cuda")) == "fused"
    assert lnstd.Explainer(model, ["gae"], capture="fused").capture_for(torch.device("cpu")) == "fused"


class MyBlock(Block):
    """A user's subclass of timm's ViT block."""

    tag = "mine"


class MySwinBlock(SwinTransformerBlock):
    """A user's subclass of timm's Swin block."""


class MyWindowAttention(WindowAttention):
    """A user's subclass of timm's window attention, keeping its forward."""


@pytest.mark.parametrize("make", [make_vit_token, make_swin])
def test_subclassed_timm_blocks_are_supported(make):
    """Blocks (and Swin's attention) of a user's subclasses: every method runs, with the maps of the
    plain model, and the fused capture still applies."""
    model = offsets(sharpen(make()))
    x = images_for(model, batch=2, seed=9)
    plain = lnstd.Explainer(model, ALL, capture="fused")(x)
    blocks = get_adapter(model).blocks
    for ref in blocks:
        ref.block.__class__ = MyBlock if isinstance(ref.block, Block) else MySwinBlock
        if isinstance(ref.attn, WindowAttention):
            ref.attn.__class__ = MyWindowAttention
    assert all(type(b.block) in (MyBlock, MySwinBlock) for b in get_adapter(model).blocks)
    ex = lnstd.Explainer(model, ALL)
    assert ex.capture_for(torch.device("cuda")) == "fused"
    mine = lnstd.Explainer(model, ALL, capture="fused")(x, plain.targets)
    for m in ALL:
        torch.testing.assert_close(mine.heatmaps[m], plain.heatmaps[m], rtol=1e-5, atol=1e-6)
