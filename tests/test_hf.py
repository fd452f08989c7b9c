"""Hugging Face ViT, DeiT (plain and distilled) and Swin classifiers, built from a config (no download).

The proof is in three steps: the conversion's timm model gives the Hugging Face model's own logits (its
eager and SDPA forward); every method's maps on the Hugging Face model equal the timm model's (the timm
path is checked against the float64 references in test_families.py / test_lrp*.py); and for ViT and
DeiT, `attention` and `rollout` equal what the Hugging Face model's own returned attention
probabilities give.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf  # the hf extra, in dev

import lnstd
from lnstd import hf
from lnstd.arch import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

METHODS = lnstd.list_methods()
IMPLS = ["eager", "sdpa"]
VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 3, "num_labels": 5,
       "num_attention_heads": 4, "intermediate_size": 64, "layer_norm_eps": 1e-6}  # fmt: skip
# Swin-T's shape in small: four stages, 2x2 patch merging between them, shifted windows, and a last
# stage that is one unshifted window (16 -> 8 -> 4 -> 2 tokens a side, window 2; Swin-T: 56 ... 7, 7).
SWIN = {"image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 4, 8], "window_size": 2, "num_labels": 5}  # fmt: skip
KINDS = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT),
    "deit": ("DeiTForImageClassification", "DeiTConfig", VIT),
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT),
    "swin": ("SwinForImageClassification", "SwinConfig", SWIN),
}


def make_hf(kind: str, impl: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A Hugging Face classifier from its config, with weights that make the maps informative: random
    norms and position tables (zeros and ones by default), q and k scaled up (peaked attention)."""
    cls, cfg_cls, cfg = KINDS[kind]
    torch.manual_seed(seed)
    model = getattr(tf, cls)(getattr(tf, cfg_cls)(attn_implementation=impl, **cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name or "relative_position_bias_table" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "classifier" in name or name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    assert model.config._attn_implementation == impl
    return model


def images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_maps_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    spread = float(b.max() - b.min())
    assert spread > 0, what
    assert float((a - b).abs().max()) <= 1e-5 * spread, what


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_converted_timm_model_gives_the_hf_logits(kind, impl):
    model = make_hf(kind, impl)
    x = images(model)
    timm_model = hf.to_timm(model)
    with torch.no_grad():
        want = model(x).logits
        got = timm_model(x)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_equals_the_converted_timm_model(kind, impl):
    """(The capture, fused or unfused, is the timm path's: test_families.py checks both.)"""
    model = make_hf(kind, impl)
    x = images(model, batch=1)
    out = lnstd.Explainer(model, METHODS)(x)
    timm_model = hf.to_timm(model)
    ref = lnstd.Explainer(timm_model, METHODS)(x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x).logits, rtol=0, atol=1e-5)
    assert torch.equal(out.targets, ref.targets)
    for m in METHODS:
        assert out.heatmaps[m].shape == ref.heatmaps[m].shape, m
        assert_maps_equal(out.heatmaps[m], ref.heatmaps[m], f"{kind} {impl} {m}")


def _hf_attention_maps(
    model: torch.nn.Module, x: torch.Tensor, readout: list[int]
) -> dict[str, torch.Tensor]:
    """`attention` and `rollout` (METHODS.md) from the attention probabilities the Hugging Face model
    itself returns, in float64: the last block's head mean, and the product of (I + A) / rowsum."""
    with torch.no_grad():
        att = [a.double().mean(1) for a in model(x, output_attentions=True).attentions]
    n = att[0].shape[-1]
    roll = torch.eye(n, dtype=torch.float64).expand_as(att[0])
    for a in att:
        m = torch.eye(n, dtype=torch.float64) + a
        roll = (m / m.sum(-1, keepdim=True)) @ roll
    side = model.config.image_size // model.config.patch_size
    prefix = n - side * side

    def row(r: torch.Tensor) -> torch.Tensor:
        return r[:, readout].mean(1)[:, prefix:].reshape(-1, side, side)

    return {"attention": row(att[-1]), "rollout": row(roll)}


@pytest.mark.parametrize("kind, readout", [("vit", [0]), ("deit", [0]), ("deit_distilled", [0, 1])])
def test_attention_and_rollout_equal_the_hf_models_own_attentions(kind, readout):
    model = make_hf(kind, "eager")
    x = images(model)
    want = _hf_attention_maps(model, x, readout)
    got = lnstd.Explainer(model, ["attention", "rollout"])(x).heatmaps
    for m, w in want.items():
        assert_maps_equal(got[m].double(), w, f"{kind} {m}")


def _state(model: torch.nn.Module) -> dict:
    return {
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "weights": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "attn": model.config._attn_implementation,
    }


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "weights"} == {
        k: v for k, v in b.items() if k != "weights"
    } and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize("kind", KINDS)
def test_hf_model_left_as_found_after_success_and_after_an_exception(kind):
    model = make_hf(kind, "sdpa")
    for k, p in enumerate(model.parameters()):
        p.requires_grad_(k % 3 != 0)
    model.classifier.train() if hasattr(model, "classifier") else model.cls_classifier.train()
    model.register_forward_hook(lambda m, a, o: None)  # a user's hook stays
    before = _state(model)
    lnstd.Explainer(model, METHODS)(images(model))
    assert _same(_state(model), before)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="target out of range"):
        lnstd.explain(model, images(model), method="lnstd", target=99)
    with pytest.raises(AssertionError, match="Input height"):  # fails inside the forward
        lnstd.explain(model, torch.zeros(1, 3, 8, 8), method="gae")
    assert _same(_state(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_explainer_follows_weights_changed_in_place():
    model = make_hf("vit")
    x = images(model)
    ex = lnstd.Explainer(model, ["gae", "gradcam"])
    first = ex(x)
    with torch.no_grad():
        model.classifier.weight.mul_(-1.0)  # an optimiser step changes weights in place
    second = ex(x)
    fresh = lnstd.Explainer(model, ["gae", "gradcam"])(x)
    assert not torch.equal(first.logits, second.logits)
    torch.testing.assert_close(second.logits, fresh.logits)
    for m in ("gae", "gradcam"):
        assert torch.equal(second.heatmaps[m], fresh.heatmaps[m])


def test_unsupported_hf_classes_and_configs_say_why():
    vit_model = tf.ViTModel(tf.ViTConfig(**{k: v for k, v in VIT.items() if k != "num_labels"}))
    with pytest.raises(UnsupportedModelError, match="transformers ViTModel: lnstd supports ViTForImage"):
        lnstd.Explainer(vit_model, ["gae"])
    relu = tf.ViTForImageClassification(tf.ViTConfig(**{**VIT, "hidden_act": "relu"}))
    with pytest.raises(UnsupportedModelError, match="hidden_act='relu'"):
        lnstd.Explainer(relu, ["gae"])
    ape = tf.SwinForImageClassification(tf.SwinConfig(**{**SWIN, "use_absolute_embeddings": True}))
    with pytest.raises(UnsupportedModelError, match="use_absolute_embeddings"):
        lnstd.Explainer(ape, ["gae"])


def test_explaining_a_timm_model_does_not_import_transformers(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now raises
    with pytest.raises(ImportError):
        import transformers  # noqa: F401
    m = lnstd.load_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    assert lnstd.explain(m, torch.zeros(1, 3, 32, 32), method="gae").shape == (1, 4, 4)


@pytest.mark.integration
def test_job_runs_an_hf_model_from_a_save_pretrained_folder(tmp_path):
    """``lnstd run --model hf:... --checkpoint <folder>``: its rows equal the Explainer on the Hugging
    Face model, for inputs made by hand with the folder's preprocessor config (PIL bilinear resize,
    the config's mean and std)."""
    import numpy as np
    from PIL import Image

    from .jobhelpers import read_rows, run_cli

    model = make_hf("deit_distilled")
    folder = tmp_path / "tiny-deit"
    model.save_pretrained(folder)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    tf.ViTImageProcessor(
        size={"height": 32, "width": 32}, resample=2, image_mean=mean, image_std=std
    ).save_pretrained(folder)
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i, (w, h) in enumerate([(50, 30), (32, 32), (20, 44)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    r = run_cli("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
                "hf:tiny-deit", "--checkpoint", str(folder), "--methods", "gae,gradcam,attnlrp",
                "--no-progress", "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 9 and {r["status"] for r in rows} == {"ok"} and rows[0]["model"] == "hf:tiny-deit"
    for row in rows:
        img = Image.open(row["source"]).convert("RGB").resize((32, 32), Image.BILINEAR)
        x = (np.asarray(img, np.float32) / 255.0 - np.array(mean)) / np.array(std)
        x = torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None]
        want = lnstd.Explainer(model, [row["method"]])(x)
        assert row["predicted"] == int(want.predicted[0])
        got = torch.tensor(row["heatmap"]).reshape(1, row["grid_h"], row["grid_w"])
        assert_maps_equal(got, want.heatmaps[row["method"]], row["image_id"] + " " + row["method"])


def test_readme_hf_example_runs_as_written(capsys):
    import re

    from .jobhelpers import ROOT

    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Hugging Face models\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert {m: tuple(h.shape) for m, h in scope["out"].heatmaps.items()} == {
        m: (2, 4, 4) for m in ("lnstd", "attnlrp", "gradcam")
    }
    assert "torch.Size([2, 4, 4])" in capsys.readouterr().out


def test_hf_model_flags_that_cannot_work_say_why_in_one_line(tmp_path):
    from .jobhelpers import cli_in_process

    (tmp_path / "in").mkdir()
    base = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    code, err = cli_in_process(*base, "--model", "hf:tiny", "--checkpoint", str(tmp_path / "missing"))
    assert code == 2 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1
    model = make_hf("vit")
    model.save_pretrained(tmp_path / "vit")
    code, err = cli_in_process(*base, "--model", "hf:tiny", "--checkpoint", str(tmp_path / "vit"),
                               "--model-arg", "num_classes=3")  # fmt: skip
    assert code == 2 and "--model-arg does not apply to hf:tiny" in err
    tf.BeitForImageClassification(
        tf.BeitConfig(**{k: VIT[k] for k in VIT if k != "layer_norm_eps"})
    ).save_pretrained(tmp_path / "beit")
    code, err = cli_in_process(*base, "--model", "hf:beit", "--checkpoint", str(tmp_path / "beit"))
    assert code == 2 and "BeitForImageClassification checkpoint; lnstd supports ViTForImage" in err
