"""Mistakes a user can fix are refused in one line with exit code 2, before any work: an S3
endpoint that does not answer, a single image file as `run --input`, an eval folder without its
layout. Never "internal error ... this is a bug"."""

from __future__ import annotations

import socket

import pytest

from .jobhelpers import TINY_MODEL, cli_in_process, good_image, run_cli

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true"}


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_refusal(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("lnstd: error:"), err
    assert "internal error" not in err
    return lines[0]


@pytest.mark.parametrize("where", ["input", "output"])
def test_unreachable_s3_endpoint_is_a_one_line_refusal(where, tmp_path, monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(0))
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    paths = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    paths[where] = f"s3://bucket/{where}"
    code, err = cli_in_process("run", "--input", paths["input"], "--output", paths["output"], "--model",
                               TINY_MODEL, "--s3-endpoint", endpoint, "--no-progress")  # fmt: skip
    line = _one_line_refusal(code, err)
    assert endpoint in line and "cannot be reached" in line and "--s3-endpoint" in line


def test_stopped_s3_server_for_aggregate_and_report(tmp_path, monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    for cmd in ("aggregate", "report"):
        code, err = cli_in_process(cmd, "s3://bucket/out", "--s3-endpoint", endpoint)
        assert "cannot be reached" in _one_line_refusal(code, err)


def test_single_image_file_as_run_input_says_what_run_takes(tmp_path):
    image = tmp_path / "only.jpg"
    image.write_bytes(good_image(0))
    code, err = cli_in_process("run", "--input", str(image), "--output", str(tmp_path / "out"), "--model",
                               TINY_MODEL, "--no-progress")  # fmt: skip
    line = _one_line_refusal(code, err)
    assert "not found" not in line
    assert "folder" in line and "prefix" in line and "manifest" in line and "lnstd explain" in line


@pytest.mark.parametrize("layout", ["missing", "no-images", "no-masks", "bad-labels"])
def test_eval_folder_without_its_layout_is_a_one_line_refusal(layout, tmp_path):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout in ("no-masks", "bad-labels"):
        (root / "images").mkdir()
        (root / "masks").mkdir()
        for stem in ("a", "b"):
            (root / "images" / f"{stem}.png").write_bytes(good_image(1))
        if layout == "bad-labels":
            (root / "masks" / "a.png").write_bytes(good_image(1))
            (root / "masks" / "b.png").write_bytes(good_image(1))
            (root / "labels.csv").write_text("stem,label\na,cat\n")
        else:
            (root / "masks" / "a.png").write_bytes(good_image(1))
    tiny = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=1"]
    r = run_cli("eval", "--dataset", f"folder:{root}", "--model", TINY_MODEL, *tiny, "--methods", "gae",
                "--no-progress")  # fmt: skip
    line = _one_line_refusal(r.returncode, r.stderr)
    expected = {"missing": "does not exist", "no-images": "no images/ folder", "bad-labels": "line 2",
                "no-masks": "1 of 2 images have no mask (first: masks/b.png"}  # fmt: skip
    assert expected[layout] in line, line


def test_timm_names_read_from_its_source_are_timms_own_list():
    """The early check's names (timm's source read as text) equal timm's registry, so it can never
    refuse a name timm knows; deprecated aliases are among them and timm resolves each."""
    import timm

    from lnstd.timm_names import timm_names

    names = timm_names()
    assert set(timm.list_models()) <= names
    assert all(timm.is_model(n) for n in names)


@pytest.mark.integration
@pytest.mark.parametrize("command", ["run", "explain", "eval"])
def test_a_mistyped_model_name_is_refused_before_torch_is_imported(command, tmp_path):
    """Was: 8 to 16 s (timm and torch imported first). Now one line, exit 2, with torch never imported."""
    import subprocess
    import sys

    from .jobhelpers import ROOT

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(0))
    args = {
        "run": ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        "explain": ["explain", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
        "eval": ["eval", "--dataset", "toy"],
    }[command] + ["--model", "vit_smal_patch16_224.augreg_in21k"]
    script = (
        "import sys\nfrom lnstd.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    line = _one_line_refusal(r.returncode, r.stderr)
    assert line == (
        "lnstd: error: unknown timm model 'vit_smal_patch16_224.augreg_in21k'; did you mean "
        "vit_small_patch16_224, deit_small_patch16_224, vit_small_patch8_224?"
    )
    assert r.stdout.strip() == "torch not imported"
    assert not (tmp_path / "out").exists()
