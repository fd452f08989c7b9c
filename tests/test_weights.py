"""Where the weights come from (lnstd.weights): random weights said once, at the start, by `run`,
`explain` and the Ray Data Attributor, never when weights were loaded from any source; the recorded
configuration names every kind of source with the weights' digest."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from lnstd.weights import RandomWeightsWarning, Weights, weights_of

from .jobhelpers import TINY_ARGS, TINY_MODEL, good_image, model_flags, run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _digest(*files: Path, root: Path | None = None) -> str:
    """sha256 by hand: a file's bytes, or each file's name relative to ``root``, a NUL, its bytes."""
    h = hashlib.sha256()
    for f in files:
        if root is not None:
            h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert [w for w in seen if issubclass(w.category, RandomWeightsWarning)] == []
    return out


def _hub_cache(root: Path, repo: str, payload: bytes) -> Path:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors at revision COMMIT."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(payload)
    return snap / "model.safetensors"


def test_random_weights_warn_and_loaded_ones_never():
    with pytest.warns(RandomWeightsWarning, match="random weights"):
        w = weights_of(TINY_MODEL)
    assert w == Weights("random") and w.random and w.describe() == "random (none loaded)"
    with pytest.warns(RandomWeightsWarning):
        weights_of(TINY_MODEL, pretrained=False, digest=False)


def test_checkpoint_and_hf_folders_name_their_source_and_digest(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    w = _no_warning(weights_of, TINY_MODEL, ckpt)
    assert w == Weights("checkpoint", str(ckpt), _digest(ckpt))
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    want = _digest(folder / "config.json", folder / "model.safetensors", root=folder)
    for model, checkpoint in ((f"hf:{folder}", None), ("hf:tiny-deit", folder)):
        w = _no_warning(weights_of, model, checkpoint)
        assert w == Weights("hf-folder", str(folder), want), (model, checkpoint)
        assert "Hugging Face folder" in w.describe() and want[:12] in w.describe()


def test_hub_id_and_timm_pretrained_read_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = _hub_cache(tmp_path, "someone/vit-small", b"hub weights")
    w = _no_warning(weights_of, "hf:someone/vit-small")
    assert w == Weights("hf-hub", f"someone/vit-small@{COMMIT}", _digest(hub))
    repo = get_pretrained_cfg(TINY_MODEL).hf_hub_id
    timm_file = _hub_cache(tmp_path, repo, b"timm weights")
    w = _no_warning(weights_of, TINY_MODEL, pretrained=True)
    assert w == Weights("timm-pretrained", f"{repo}@{COMMIT}", _digest(timm_file))
    assert _no_warning(weights_of, TINY_MODEL, pretrained=True, digest=False) == Weights(
        "timm-pretrained", TINY_MODEL
    )


def test_recorded_configurations_old_and_new():
    new = {"weights": {"source": "hf-hub", "location": "a/b@c", "sha256": "ff"}, "pretrained": False}
    assert Weights.from_config(new) == Weights("hf-hub", "a/b@c", "ff")
    assert Weights.from_config({"model": "m", "pretrained": False, "checkpoint": None}).random
    assert Weights.from_config({"model": "hf:x", "pretrained": False, "checkpoint": None}).source == "hf-hub"
    assert (
        Weights.from_config({"model": "m", "pretrained": True, "checkpoint": None}).source
        == "timm-pretrained"
    )
    old_identity = {"model": "m", "pretrained": False, "checkpoint_sha256": "a0cc80"}  # run.json
    assert Weights.from_config(old_identity) == Weights("checkpoint", None, "a0cc80")
    assert Weights.from_config({"model": "m", "pretrained": False, "checkpoint_sha256": None}).random
    assert Weights.from_config({}) is None  # nothing known: no banner


def test_explain_says_random_weights_once_before_the_work(tmp_path):
    (tmp_path / "a.png").write_bytes(good_image(1))
    tiny = [f for k, v in TINY_ARGS.items() for f in ("--model-arg", f"{k}={v}")]
    r = run_cli("explain", str(tmp_path / "a.png"), "--model", TINY_MODEL, *tiny, "--methods", "gae",
                "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [ln for ln in lines if "random weights" in ln] == [lines[0]]
    assert lines[0].startswith("lnstd: warning: random weights")
    flags = model_flags(tiny_checkpoint(tmp_path))
    r = run_cli(
        "explain", str(tmp_path / "a.png"), *flags, "--methods", "gae", "--out", str(tmp_path / "out")
    )
    assert r.returncode == 0 and "random weights" not in r.stderr, r.stderr


def test_attributor_warns_of_random_weights_only(tmp_path):
    from lnstd.ray import Attributor

    with pytest.warns(RandomWeightsWarning):
        Attributor(TINY_MODEL, ["gae"], model_args=TINY_ARGS)
    _no_warning(
        Attributor, TINY_MODEL, ["gae"], model_args=TINY_ARGS, checkpoint=str(tiny_checkpoint(tmp_path))
    )


@pytest.mark.integration
@pytest.mark.slow  # a whole job, about 55 s; the weights record is unit-tested above
def test_run_of_an_hf_folder_records_it_and_random_weights_are_said_first(tmp_path):
    from .test_hf import make_hf

    folder = tmp_path / "tiny-deit"
    make_hf("deit_distilled").save_pretrained(folder)
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.png").write_bytes(good_image(2 * i + 1))
    common = ["--input", str(tmp_path / "in"), "--methods", "gae", "--no-progress", "--cpus-per-actor", "0.5"]
    r = run_cli("run", *common, "--output", str(tmp_path / "hf"), "--model", f"hf:{folder}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "random weights" not in r.stderr
    config = json.loads((tmp_path / "hf" / "_manifest.json").read_text())["config"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert config["weights"] == {"source": "hf-folder", "location": str(folder),
                                 "sha256": _digest(*files, root=folder)}  # fmt: skip
    page = (tmp_path / "hf" / "_report.html").read_text()
    assert "random-weights" not in page and "none loaded" not in page and "Hugging Face folder" in page

    tiny = [f for k, v in TINY_ARGS.items() for f in ("--model-arg", f"{k}={v}")]
    r = run_cli("run", *common, "--output", str(tmp_path / "rand"), "--model", TINY_MODEL, *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    said = [k for k, ln in enumerate(lines) if "random weights" in ln]
    ray = next(k for k, ln in enumerate(lines) if ln.startswith("lnstd: actor 0 ready"))
    assert len(said) == 1 and said[0] < ray, r.stderr  # once, before Ray started the actors
    assert lines[said[0]].startswith("lnstd: warning: random weights")
    config = json.loads((tmp_path / "rand" / "_manifest.json").read_text())["config"]
    assert config["weights"] == {"source": "random", "location": None, "sha256": None}
    assert "id='random-weights'" in (tmp_path / "rand" / "_report.html").read_text()
