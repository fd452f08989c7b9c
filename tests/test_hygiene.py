"""The model is left exactly as found: hooks, fused-attention flags, requires_grad, modes, grads."""

from __future__ import annotations

import pytest
import torch

import lnstd
from lnstd.arch import get_adapter

from .helpers import images_for, make_swin, make_vit_token


def _state(model):
    return {
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        },
        "fused": [b.attn.fused_attn for b in get_adapter(model).blocks],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _unusual(model):
    """A model state that differs from the defaults, so restoring it is a real check."""
    blocks = get_adapter(model).blocks
    for k, b in enumerate(blocks):
        b.attn.fused_attn = k % 2 == 0
    for k, p in enumerate(model.parameters()):
        p.requires_grad_(k % 3 != 0)
    model.head.train()
    model.head.register_forward_hook(lambda m, a, o: None)  # a user's own hook must survive
    return model


@pytest.mark.parametrize("capture", ["fused", "unfused"])
@pytest.mark.parametrize("make", [make_vit_token, make_swin])
def test_model_restored_after_success(make, capture):
    model = _unusual(make())
    before = _state(model)
    lnstd.Explainer(model, lnstd.list_methods(), capture=capture)(images_for(model))
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("capture", ["fused", "unfused"])
@pytest.mark.parametrize("make", [make_vit_token, make_swin])
def test_model_restored_after_exception_in_forward_and_after(make, capture):
    model = _unusual(make())
    before = _state(model)

    def boom(m, a, o):
        raise RuntimeError("boom")

    h = model.head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        lnstd.explain(model, images_for(model), method="lnstd", capture=capture)
    h.remove()
    assert _state(model) == before
    with pytest.raises(ValueError, match="out of range"):  # raised after the forward pass
        lnstd.explain(model, images_for(model), method="gae", target=99, capture=capture)
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("capture", ["fused", "unfused"])
def test_same_result_whatever_the_fused_attention_setting(capture):
    model = make_vit_token()
    x = images_for(model)
    results = []
    for fused in (True, False):
        for b in get_adapter(model).blocks:
            b.attn.fused_attn = fused
        results.append(lnstd.explain(model, x, method="lnstd", capture=capture))
        assert all(b.attn.fused_attn == fused for b in get_adapter(model).blocks)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("capture", ["fused", "unfused"])
def test_gradients_stop_at_first_selected_block(capture):
    """With blocks=1 the backward never reaches earlier blocks: their graph is never built."""
    model = make_vit_token()
    seen = []
    for k, b in enumerate(model.blocks):
        b.attn.qkv.register_forward_hook(lambda m, a, o, k=k: seen.append((k, o.requires_grad)))
    lnstd.explain(model, images_for(model), method="gae", blocks=1, capture=capture)
    assert seen == [(0, False), (1, False), (2, True)]
