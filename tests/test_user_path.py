"""The path a new user walks: flags that show their defaults, a first run that is quick, commands
that never overwrite what they should not, output names that do not collide, messages on lines of
their own, and a README whose commands run as written."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lnstd.cli import build_parser
from lnstd.jobs.specs import expand_specs
from lnstd.train import toy_checkpoint

from .jobhelpers import ROOT, cli_in_process, good_image

README = (ROOT / "README.md").read_text()


# --- flags ---------------------------------------------------------------------------------------------
def test_help_shows_the_defaults(capsys):
    for cmd, needles in (
        ("run", ["--batch-size BATCH_SIZE  (default: 32)", "(default: lnstd,gae)", "(default: 256)"]),
        ("explain", ["(default: lnstd,gae)", "(default: 16)"]),
        ("train-toy", ["(default: toy-checkpoints)", "(default: 2000)"]),
    ):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([cmd, "--help"])
        assert exc.value.code == 0
        text = re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", capsys.readouterr().out))  # help wraps at "-"
        for needle in needles:
            assert re.sub(r"\s+", " ", needle) in text, (cmd, needle)


def test_a_first_run_computes_the_papers_method_and_one_baseline_and_all_is_one_word():
    parse = build_parser().parse_args
    assert parse(["run"]).methods == ["lnstd", "gae"]
    assert parse(["explain", "x.png", "--out", "o"]).methods == ["lnstd", "gae"]
    assert parse(["run", "--methods", "all"]).methods == []  # every method that applies to the model
    assert parse(["eval", "--dataset", "toy"]).methods == []  # a benchmark compares them all


def test_spec_with_an_equals_sign_is_the_same_spec():
    rest = ["--input", "in", "--output", "out"]
    spaced = expand_specs(["run", "--spec", "folder-local", *rest])
    assert expand_specs(["run", "--spec=folder-local", *rest]) == spaced
    assert "--methods" in spaced and spaced[-4:] == rest  # the spec's flags, then the user's
    code, err = cli_in_process("run", "--spe", "folder-local")  # an abbreviation is not silently dropped
    assert code == 2 and "unrecognized arguments: --spe folder-local" in err and err.count("\n") == 1


# --- train-toy never overwrites the committed models ----------------------------------------------------
def test_train_toy_writes_to_a_new_folder_and_refuses_to_overwrite_without_force(tmp_path):
    committed = toy_checkpoint("vit")
    before = (committed.read_bytes(), committed.stat().st_mtime_ns)
    assert Path(build_parser().parse_args(["train-toy"]).out).resolve() != committed.parent.resolve()
    # the command the README's old text gave: refused, in one line, before any training
    code, err = cli_in_process("train-toy", "--arch", "vit", "--out", str(committed.parent))
    assert code == 2 and err.count("\n") == 1
    assert "toy_vit.safetensors already there (the committed, trained models)" in err and "--force" in err
    assert (committed.read_bytes(), committed.stat().st_mtime_ns) == before
    # a model of one's own: refused too, and replaced with --force
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "toy_vit.safetensors").write_bytes(b"my model")
    quick = ["--arch", "vit", "--out", str(mine), "--steps", "1", "--train-images", "64", "--batch", "8"]
    code, err = cli_in_process("train-toy", *quick)
    assert code == 2 and "toy_vit.safetensors already there; give another --out" in err
    assert (mine / "toy_vit.safetensors").read_bytes() == b"my model"
    code, err = cli_in_process("train-toy", *quick, "--force")
    assert code == 0, err
    assert (mine / "toy_vit.safetensors").read_bytes() != b"my model" and (mine / "toy_vit.json").exists()


# --- explain keeps every file's pictures --------------------------------------------------------------
def test_explain_keeps_same_named_files_from_different_folders_apart(tmp_path):
    for k, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "img.png").write_bytes(good_image(2 * k + 1))
    (tmp_path / "a" / "img.jpg").write_bytes(good_image(4))  # same stem, other extension
    out = tmp_path / "o"
    files = [str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png"), str(tmp_path / "a")]
    code, err = cli_in_process("explain", *files, "--checkpoint", str(toy_checkpoint("vit")),
                               "--methods", "gae", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "3 images explained" in err  # a/img.png given twice (by name and in its folder) counts once
    pictures = sorted(p.relative_to(out / "toy_vit").as_posix() for p in out.rglob("*_gae.png"))
    assert pictures == ["a/img_jpg_gae.png", "a/img_png_gae.png", "b/img_gae.png"]
    contents = {p.read_bytes() for p in out.rglob("*_gae.png")}
    assert len(contents) == 3  # three different images, three different pictures


# --- messages on lines of their own --------------------------------------------------------------------
def _segments(text: str) -> list[str]:
    """What a terminal shows: a progress bar redraws its line after a carriage return."""
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]


def test_an_interrupt_message_does_not_share_the_progress_bars_line(monkeypatch):
    from tqdm import tqdm

    import lnstd.cli

    def interrupted(args):
        bar = tqdm(total=40, unit="img", file=sys.stderr, mininterval=0)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(lnstd.cli, "_cmd_methods", interrupted)
    code, err = cli_in_process("methods")
    assert code == 130 and "3/40" in err
    assert err.endswith("\nlnstd: interrupted\n"), repr(err)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["run"], "lnstd: interrupted (a rerun of the same command resumes)\n"),
        (["explain", "a.png", "--out", "o"], "lnstd: interrupted\n"),  # nothing to resume: it starts over
        (["eval", "--dataset", "toy"], "lnstd: interrupted\n"),
    ],
)
def test_only_an_interrupted_run_is_said_to_resume(monkeypatch, args, said):
    import lnstd.cli

    def interrupted(args):
        raise KeyboardInterrupt

    for name in ("_cmd_run", "_cmd_explain", "_cmd_eval"):
        monkeypatch.setattr(lnstd.cli, name, interrupted)
    assert cli_in_process(*args) == (130, said)


def test_job_log_lines_do_not_share_the_progress_bars_line(monkeypatch):
    from tqdm import tqdm

    from lnstd.jobs.console import log as _log

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = tqdm(total=40, unit="img", file=sys.stderr, mininterval=0)
    bar.update(3)
    _log("shard 2 failed (boom); retrying")
    bar.update(1)
    bar.close()
    text = err.getvalue()
    assert "lnstd: shard 2 failed (boom); retrying" in _segments(text), repr(text)
    assert text.index("lnstd: shard 2") > text.index("3/40")  # after the bar was drawn, yet apart


# --- the aggregate's text --------------------------------------------------------------------------------
def test_aggregate_table_aligns_long_method_names_and_counts_read_as_english():
    from lnstd.aggregate import format_table, plural

    rows = [
        {"method": m, "metric": k, "count": 3.0, "mean": 0.5, "std": 0.1, "median": 0.5}
        for m in ("gae", "transformer_attribution")
        for k in ("probability", "foreground_iou")
    ]
    lines = format_table(pa.Table.from_pylist(rows)).splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({len(ln) for ln in lines}) == 1, lines  # every line as long as the header
    starts = {ln.index(k) for ln in lines[2:] for k in ("probability", "foreground_iou") if k in ln}
    assert starts == {lines[0].index("metric")}, lines  # the metric column starts at one offset
    assert {ln.split()[2] for ln in lines[2:]} == {"3"}  # the count is the third column on every line
    assert [plural(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]


# --- the README ------------------------------------------------------------------------------------------
def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_commands_run_as_written():
    lines = _bash_lines(README)
    activate = next(
        i for i, ln in enumerate(lines) if ln.startswith(("source .venv/bin/activate", ". .venv"))
    )
    for i, ln in enumerate(lines):
        if re.match(r"(lnstd|ray) ", ln):
            assert i > activate, f"README: {ln!r} comes before the step that puts lnstd/ray on PATH"
    # Ray's token authentication: ray start --head and ray job submit need the same setting
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ray start --head"))
    submit = next(i for i, ln in enumerate(lines) if ln.startswith("ray job submit"))
    auth = [i for i, ln in enumerate(lines) if ln.startswith("export RAY_AUTH_MODE=disabled")]
    assert auth and auth[0] < start < submit
    # train-toy in the README never points at the committed models
    assert not [ln for ln in lines if "train-toy" in ln and "lnstd/checkpoints" in ln]


def test_readme_has_one_exit_code_table_with_every_code():
    table = re.search(r"\| exit code \|.*?\n\n", README, re.S)
    assert table, "README: no exit-code table"
    codes = re.findall(r"^\| `?(\d+)`? \|", table.group(0), re.M)
    assert set(codes) >= {"0", "1", "2", "130"}
    assert "lnstd explain" in table.group(0)


# --- the run's configuration from its flags -------------------------------------------------------------
def test_every_run_flag_reaches_its_config_field(tmp_path):
    """RunConfig.from_args maps each flag to the field of its name: every field but the checkpoint's
    is set here to a value other than its default, and read back."""
    from dataclasses import fields

    from lnstd.config import RunConfig

    args = build_parser().parse_args([
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "m",
        "--methods", "gae,lnstd", "--model-arg", "depth=2", "--option", "blocks=1", "--batch-size", "3",
        "--shard-size", "5", "--actors", "2", "--gpus-per-actor", "0.5", "--cpus-per-actor", "2",
        "--address", "auto", "--precision", "bf16", "--capture", "fused", "--target", "topk:3",
        "--fit", "center-crop", "--decode", "gpu", "--save-png", "--overwrite", "--refresh-input", "--dedupe",
        "--s3-endpoint", "http://x", "--lease-ttl", "7", "--startup-timeout", "9", "-v", "--fail-on-errors",
        "--pretrained", "--faithfulness", "deletion,road", "--max-image-pixels", "1000",
    ])  # fmt: skip
    expect = dict(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m", methods=["gae", "lnstd"],
        model_args={"depth": 2}, options={"blocks": 1}, batch_size=3, shard_size=5, actors=2,
        gpus_per_actor=0.5, cpus_per_actor=2.0, address="auto", precision="bf16", capture="fused",
        target="topk:3", fit="center-crop", decode="gpu", save_png=True, overwrite=True, refresh_input=True,
        dedupe=True, s3_endpoint="http://x", lease_ttl=7.0, startup_timeout=9.0, verbose=True,
        fail_on_errors=True, pretrained=True, faithfulness=["deletion", "road"], max_image_pixels=1000,
    )  # fmt: skip
    cfg = RunConfig.from_args(args)
    # the checkpoint's (a flag of its own, and its digest) and the weights' record (made at validation)
    assert {f.name for f in fields(RunConfig)} - set(expect) == {"checkpoint", "checkpoint_sha256", "weights"}
    assert {k: getattr(cfg, k) for k in expect} == expect
    defaults = RunConfig(input="i", output="o", model="m", methods=[])
    assert all(getattr(defaults, k) != v for k, v in expect.items() if k not in ("model",))
    assert cfg.identity()["target"] == "topk:3" and cfg.topk == 3  # recorded as written
    given = RunConfig.from_args(args, model="n", checkpoint=None, model_args={})
    assert (given.model, given.model_args, given.methods) == ("n", {}, ["gae", "lnstd"])


def test_a_target_is_parsed_once_into_its_kind():
    from lnstd.config import Target
    from lnstd.errors import UsageError

    for text, kind, k in [("predicted", "predicted", None), ("label", "label", None), ("topk:5", "topk", 5)]:
        target = Target.parse(text)
        assert (target.kind, target.k, str(target)) == (kind, k, text)
    assert Target.parse("7", allowed=("predicted", "class")) == Target("class", 7)
    bad_targets = [("topk:0", "positive integer K"), ("topk:x", "positive integer K"), ("best", "--target"),
                   ("7", "predicted, label, topk:K")]  # fmt: skip
    for bad, needle in bad_targets:
        with pytest.raises(UsageError, match=needle):
            Target.parse(bad)
    with pytest.raises(UsageError, match="must be predicted, a class index, got 'label'"):
        Target.parse("label", allowed=("predicted", "class"))


# --- small things a newcomer reads -------------------------------------------------------------------
def test_explain_has_a_default_out_and_caps_the_strip_of_a_very_wide_image(tmp_path, monkeypatch):
    """Like run, explain writes under the current folder by default (lnstd-explain/); a 4000 x 20
    image keeps its full-size overlay but its strip is not 4000 / 20 x 192 px wide per panel."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 4000, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    code, err = cli_in_process(
        "explain", "wide.png", "--checkpoint", str(toy_checkpoint("vit")), "--methods", "gae"
    )
    assert code == 0, err
    out = tmp_path / "lnstd-explain" / "toy_vit"
    assert Image.open(out / "wide_gae.png").size == (4000, 20)  # the overlay: the image's own pixels
    strip = Image.open(out / "wide_strip.png").size
    assert strip[0] <= 2 * (4 * 192 + 4) and strip[1] <= 192 + 18, strip  # two panels: image, gae


def test_methods_lists_plain_text_and_says_what_blocks_does(capsys):
    from lnstd.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "`" not in out and "gradients stop" not in out, out
    rollout = out[out.index("\nrollout ") :].splitlines()
    assert rollout[2].strip() == "blocks='all': 'all' or k: the chain runs over the last k blocks only"


def test_run_help_names_hugging_face_models_under_model(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert re.search(r"--model MODEL timm model name, or hf:NAME for a Hugging Face", text), text
