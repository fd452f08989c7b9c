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
    with pytest.raises(ValueError, match="not a weights-only torch checkpoint"):
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        lnstd.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown timm model"):
        lnstd.load_model("vit_nonexistent")


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


def test_cli_entry_points():
    out = subprocess.run([sys.executable, "-m", "lnstd", "methods"], capture_output=True, text=True)
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines()] == lnstd.list_methods()
    bad = subprocess.run([sys.executable, "-m", "lnstd", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--bogus" in bad.stderr
