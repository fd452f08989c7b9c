"""Attribution core: fast path vs the literal METHODS.md reference, batching, options, geometry."""

from __future__ import annotations

import pytest
import torch

import lnstd
from lnstd.arch import get_adapter

from .helpers import assert_window_map_exact, images_for, make_swin, make_vit_avg_reg, make_vit_token, sharpen
from .reference import reference_heatmap

METHODS = ["attention", "rollout", "gae", "lnstd", "gradcam"]
MODELS = {
    "vit_token": lambda: sharpen(make_vit_token()),
    "vit_avg_reg": lambda: sharpen(make_vit_avg_reg()),
    "swin": lambda: sharpen(make_swin()),
}


def test_registry_lists_all_methods():
    assert lnstd.list_methods() == sorted([*METHODS, "attnlrp", "transformer_attribution"])  # test_lrp.py
    with pytest.raises(ValueError, match="unknown method 'nope'.*gae"):
        lnstd.explain(make_vit_token(), torch.randn(1, 3, 32, 48), method="nope")


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_image(arch, method):
    model = MODELS[arch]()
    x = images_for(model, batch=4)
    batched = lnstd.explain(model, x, method=method)
    single = torch.cat([lnstd.explain(model, x[i : i + 1], method=method) for i in range(4)])
    assert batched.dtype == torch.float32
    assert batched.abs().sum() > 0
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def _ref_cases():
    cases = []
    for arch in MODELS:
        for method in ["attention", "rollout", "gae", "gradcam"]:
            cases.append((arch, method, {}))
        for std in ("inverse", "multiply", "none"):
            for norm in ("matrix", "row", "none"):
                cases.append((arch, "lnstd", {"std": std, "normalize": norm}))
    for method in ["rollout", "gae"]:
        cases.append(("swin", method, {"blocks": 2}))
    cases.append(("swin", "lnstd", {"blocks": "all"}))
    cases.append(("vit_token", "gae", {"blocks": 2}))
    return cases


@pytest.mark.parametrize("capture", ["fused", "unfused"])
@pytest.mark.parametrize(("arch", "method", "opts"), _ref_cases())
def test_fast_path_equals_reference(arch, method, opts, capture):
    model = MODELS[arch]()
    x = images_for(model, batch=2, seed=3)
    fast = lnstd.explain(model, x, method=method, capture=capture, **opts)
    for i in range(2):
        ref = reference_heatmap(model, x[i : i + 1], method, **opts).float()
        assert fast[i].shape == ref.shape
        torch.testing.assert_close(fast[i], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(MODELS))
def test_fused_capture_equals_unfused_for_every_method(arch):
    model = MODELS[arch]()
    x = images_for(model, batch=3, seed=5)
    target = torch.tensor([1, 0, 2])
    fused = lnstd.Explainer(model, METHODS, capture="fused")(x, target)
    unfused = lnstd.Explainer(model, METHODS, capture="unfused")(x, target)
    torch.testing.assert_close(fused.logits, unfused.logits, atol=1e-5, rtol=1e-5)
    for m in METHODS:
        assert fused.heatmaps[m].abs().sum() > 0
        torch.testing.assert_close(fused.heatmaps[m], unfused.heatmaps[m], atol=1e-5, rtol=1e-5)


def test_fused_capture_keeps_the_fused_kernel_and_one_block_in_memory(monkeypatch):
    """The model runs F.scaled_dot_product_attention (not timm's unfused path), and when a block is
    handed to the methods, no other block's rebuilt attention matrix is still alive."""
    import weakref

    import torch.nn.functional as F

    from lnstd.arch.base import Adapter
    from lnstd.relevance import ChainRunner

    model = sharpen(make_vit_token(depth=4))
    sdpa_calls, alive, peak = [], [], []
    real_sdpa, real_rebuild, real_feed = (
        F.scaled_dot_product_attention,
        Adapter.rebuild_attention,
        ChainRunner.feed,
    )
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k)
    )

    def rebuild(self, block, parts):
        a = real_rebuild(self, block, parts)
        alive.append(weakref.ref(a))
        return a

    def feed(self, view):
        real_feed(self, view)
        import gc

        gc.collect()
        peak.append(sum(r() is not None for r in alive))

    monkeypatch.setattr(Adapter, "rebuild_attention", rebuild)
    monkeypatch.setattr(ChainRunner, "feed", feed)
    lnstd.Explainer(model, ["gae", "lnstd", "rollout"], capture="fused")(images_for(model, batch=2))
    assert len(sdpa_calls) == 4  # every block ran the fused kernel
    assert len(alive) == 4 and len(peak) == 4 * 3  # each chain is fed each block
    assert max(peak) == 1, peak  # only the block being processed holds its A


def test_options_are_routed_to_the_methods_that_declare_them(vit_token):
    x = images_for(vit_token)
    ex = lnstd.Explainer(vit_token, ["gae", "lnstd", "gradcam"], blocks=2, **{"lnstd.std": "multiply"})
    assert ex.options == {
        "gae": {"blocks": 2},
        "lnstd": {"blocks": 2, "std": "multiply", "normalize": "matrix", "base": "gae"},
        "gradcam": {},
    }
    out = ex(x)
    torch.testing.assert_close(
        out.heatmaps["lnstd"], lnstd.explain(vit_token, x, "lnstd", blocks=2, std="multiply")
    )
    with pytest.raises(TypeError, match="unknown option 'std' for gae.*blocks"):
        lnstd.Explainer(vit_token, ["gae"], std="multiply")
    with pytest.raises(TypeError, match="for method 'rollout', which is not among"):
        lnstd.Explainer(vit_token, ["gae"], **{"rollout.blocks": 2})
    assert lnstd.Explainer(make_swin(), ["lnstd", "gae"]).options["lnstd"]["blocks"] == 2  # Swin default
    assert lnstd.Explainer(make_swin(), ["lnstd", "gae"]).options["gae"]["blocks"] == "all"


def test_swin_heat_resolution_follows_first_selected_block(swin):
    x = images_for(swin, batch=1)
    # 11x11 first stage, 6x6 second stage (odd grid padded by patch merging).
    assert lnstd.explain(swin, x, method="gae").shape == (1, 11, 11)
    assert lnstd.explain(swin, x, method="lnstd").shape == (1, 6, 6)  # Swin default: last 2 blocks
    assert lnstd.explain(swin, x, method="lnstd", blocks=3).shape == (1, 11, 11)


def test_lnstd_without_std_and_norm_is_gae(vit_token, swin):
    for model in (vit_token, swin):
        x = images_for(model)
        gae = lnstd.explain(model, x, method="gae", blocks="all")
        ln = lnstd.explain(model, x, method="lnstd", std="none", normalize="none", blocks="all")
        assert torch.equal(gae, ln)


def test_explainer_one_pass_matches_single_method_calls(vit_avg_reg):
    x = images_for(vit_avg_reg)
    out = lnstd.Explainer(vit_avg_reg, METHODS)(x)
    for m in METHODS:
        torch.testing.assert_close(out.heatmaps[m], lnstd.explain(vit_avg_reg, x, method=m))
    logits = vit_avg_reg(x)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.predicted, logits.argmax(1))
    assert torch.equal(out.targets, out.predicted)
    torch.testing.assert_close(out.probabilities, logits.softmax(1).max(1).values)


def test_explainer_runs_a_single_backward(vit_token, monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    lnstd.Explainer(vit_token, ["gae", "lnstd", "gradcam"])(images_for(vit_token))
    assert len(calls) == 1
    calls.clear()
    lnstd.Explainer(vit_token, ["attention", "rollout"])(images_for(vit_token))
    assert calls == []


def test_targets_int_and_tensor(vit_token):
    x = images_for(vit_token)
    by_int = lnstd.explain(vit_token, x, method="gae", target=3)
    by_tensor = lnstd.explain(vit_token, x, method="gae", target=torch.tensor([3, 3, 3]))
    assert torch.equal(by_int, by_tensor)
    ref = reference_heatmap(vit_token, x[:1], "gae", target=3).float()
    torch.testing.assert_close(by_int[0], ref, atol=1e-5, rtol=1e-4)
    other = lnstd.explain(vit_token, x, method="gae", target=torch.tensor([0, 1, 2]))
    assert not torch.allclose(other, by_int)
    with pytest.raises(ValueError, match="out of range"):
        lnstd.explain(vit_token, x, method="gae", target=7)
    with pytest.raises(ValueError, match="LongTensor of shape"):
        lnstd.explain(vit_token, x, method="gae", target=torch.tensor([1.0, 2.0, 3.0]))


def test_bad_options_name_the_option(vit_token):
    x = images_for(vit_token, batch=1)
    with pytest.raises(TypeError, match="unknown option 'blockz'"):
        lnstd.explain(vit_token, x, blockz=2)
    with pytest.raises(ValueError, match="std must be one of"):
        lnstd.explain(vit_token, x, std="divide")
    with pytest.raises(ValueError, match="normalize must be one of"):
        lnstd.explain(vit_token, x, normalize="l2")
    with pytest.raises(ValueError, match="blocks must be 'all' or an int in 1..3"):
        lnstd.explain(vit_token, x, blocks=4)
    with pytest.raises(ValueError, match="precision must be one of"):
        lnstd.explain(vit_token, x, precision="int8")


def test_grid_comes_from_the_model():
    torch.manual_seed(0)
    model = make_vit_token(img_size=64, patch_size=16, dynamic_img_size=True)
    assert lnstd.explain(model, torch.randn(2, 3, 64, 64)).shape == (2, 4, 4)
    assert lnstd.explain(model, torch.randn(2, 3, 48, 96)).shape == (2, 3, 6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_keeps_float32_relevance(vit_token, precision):
    x = images_for(vit_token)
    ref = lnstd.explain(vit_token, x, method="lnstd")
    low = lnstd.explain(vit_token, x, method="lnstd", precision=precision)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    corr = torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1]
    assert corr > 0.9


def test_swin_window_map_by_brute_force_on_real_block(swin):
    """Perturbing one input token of a real timm Swin block changes exactly the outputs of its window."""
    assert_window_map_exact(swin)


def test_unsupported_model_error_names_class():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(lnstd.UnsupportedModelError, match=r"ResNet.*VisionTransformer.*SwinTransformer"):
        lnstd.explain(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(lnstd.UnsupportedModelError, match="global_pool='map'"):
        get_adapter(make_vit_token(global_pool="map"))


def test_upsample_and_minmax():
    heat = torch.zeros(2, 2, 3)
    heat[0, 0, 0] = 5.0
    heat[1] = 7.0
    up = lnstd.upsample(heat, (20, 30))
    assert up.shape == (2, 20, 30)
    assert up[0, 0, 0] == up[0].max() and up[0, -1, -1] == 0
    mm = lnstd.minmax(up)
    assert mm[0].max() == 1 and mm[0].min() == 0
    assert torch.equal(mm[1], torch.zeros(20, 30))


def test_explainer_times_each_method_on_its_own(vit_token, monkeypatch):
    """A known delay put into one method's own work is charged to that method, not shared; the
    methods' times add up to the whole call."""
    import time

    from lnstd.methods.gradcam import GradCAM
    from lnstd.methods.lnstd import LNStd

    blocks = []
    real_block, real_compute = LNStd.block_matrix, GradCAM.compute
    monkeypatch.setattr(
        LNStd, "block_matrix", lambda self, view: blocks.append(time.sleep(0.1)) or real_block(self, view)
    )
    monkeypatch.setattr(GradCAM, "compute", lambda self, ctx: time.sleep(0.4) or real_compute(self, ctx))
    x = images_for(vit_token)
    explainer = lnstd.Explainer(vit_token, ["gae", "lnstd", "gradcam"])
    t0 = time.perf_counter()
    out = explainer(x)
    wall = (time.perf_counter() - t0) * 1000
    ms = out.elapsed_ms
    assert list(ms) == ["gae", "lnstd", "gradcam"] and blocks
    # gae gets the same share of the shared pass as the others: the differences are the delays
    # (the margin: a busy machine may pause the process while it does gae's own small share)
    assert ms["lnstd"] - ms["gae"] >= 0.8 * 100 * len(blocks) and ms["gradcam"] - ms["gae"] >= 0.8 * 400
    assert wall * 0.9 <= sum(ms.values()) <= wall


def test_explainer_charges_the_relevance_walk_to_the_methods_that_need_it(vit_token, monkeypatch):
    import time

    from lnstd.lrp import AttentionRelevance

    steps = []
    real = AttentionRelevance.step
    monkeypatch.setattr(
        AttentionRelevance, "step", lambda self, *a: steps.append(time.sleep(0.1)) or real(self, *a)
    )
    explainer = lnstd.Explainer(vit_token, ["gae", "transformer_attribution"])
    ms = explainer(images_for(vit_token)).elapsed_ms
    assert steps and ms["transformer_attribution"] - ms["gae"] >= 0.8 * 100 * len(steps)
