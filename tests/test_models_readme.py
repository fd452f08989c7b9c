"""load_model (safe checkpoints), the README example as written, and the command line."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lnstd
from lnstd.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


def test_load_model_from_safetensors_and_torch_files(tmp_path):
    torch.manual_seed(0)
    src = lnstd.load_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    for ckpt in ("w.safetensors", "w.pth"):
        torch.manual_seed(1)  # a different random init, overwritten by the checkpoint
        m = lnstd.load_model(
            "vit_tiny_patch16_224", checkpoint=tmp_path / ckpt, num_classes=4, img_size=32, patch_size=8
        )
        assert not m.training
        torch.testing.assert_close(m(x), src.eval()(x))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_model_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ModelError, match="refused, it is not a weights-only torch checkpoint"):
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=path)
    with pytest.raises(ModelError, match="checkpoint not found"):
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="unknown timm model"):
        lnstd.load_model("vit_nonexistent")


def test_load_model_says_why_a_checkpoint_cannot_be_read(tmp_path):
    """A damaged file is not reported as a refused pickle, and a mismatch names the tensor."""
    torch.manual_seed(0)
    src = lnstd.load_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:500])
    with pytest.raises(ModelError, match="cannot be read as a torch checkpoint") as info:
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "cut.pth", num_classes=4)
    assert "weights-only" not in str(info.value)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "bad.safetensors")
    with pytest.raises(ModelError, match="shape of head.bias is \\(4,\\), the model.s is \\(7,\\)"):
        lnstd.load_model(
            "vit_tiny_patch16_224", checkpoint=tmp_path / "w.pth", num_classes=7, img_size=32, patch_size=8
        )


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Explain a batch in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    img = Image.open(tmp_path / "overlay.png")
    assert img.size == (256, 256)
    assert len(set(img.getdata())) > 50  # a real blend, not a flat picture


def test_overlay_is_hot_where_the_map_is_hot():
    heat = torch.zeros(4, 6)
    heat[0, 0] = 1.0  # top-left token only
    img = lnstd.viz.overlay(Image.new("RGB", (120, 60), "gray"), heat, alpha=1.0)
    px = img.load()
    bright = sum(px[5, 5])
    assert bright > sum(px[115, 55]) + 200 and bright > sum(px[115, 5]) + 200


@pytest.mark.integration
def test_cli_entry_points():
    out = subprocess.run([sys.executable, "-m", "lnstd", "methods"], capture_output=True, text=True)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if not ln.startswith(" ")] == lnstd.list_methods()
    options = [ln.split()[0] for ln in lines if ln.startswith(" ")]
    assert "std='inverse'" in options and "normalize='matrix'" in options  # lnstd's declared defaults
    assert any(ln.strip().startswith("blocks='all' (swin: 2") for ln in lines)  # and its per-family default
    bad = subprocess.run([sys.executable, "-m", "lnstd", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


@pytest.mark.integration  # a fresh interpreter: which of lnstd's names is loaded first matters
@pytest.mark.parametrize(
    "first",
    ["import lnstd.explainer as module", "import lnstd; lnstd.explain; import lnstd.explainer as module"],
)
def test_the_explainer_module_and_the_explain_function_do_not_collide(first):
    """``import lnstd.explainer`` gives the module (its Explainer usable), ``lnstd.explain`` stays
    the function whichever is loaded first, and the package is a plain module (no class swap)."""
    code = (
        f"{first}\n"
        "import types, torch, lnstd\n"
        "from tests.helpers import make_vit_token\n"
        "assert type(lnstd) is types.ModuleType, type(lnstd)\n"
        "assert module.Explainer is lnstd.Explainer\n"
        "model, x = make_vit_token(), torch.randn(2, 3, 32, 48)\n"
        "out = module.Explainer(model, ['gae'])(x)\n"
        "heat = lnstd.explain(model, x, method='gae')\n"
        "assert lnstd.explain is module.explain and isinstance(heat, torch.Tensor)\n"
        "assert torch.equal(heat, out.heatmaps['gae']), (heat - out.heatmaps['gae']).abs().max()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-1000:]
