"""What a newcomer meets first and what a maintainer checks: the demo and its output as data, early
one-line errors, unschedulable resources, the shipped specs, the package's layering and layout."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from .browser import visit
from .jobhelpers import (
    ROOT,
    cli_in_process,
    good_image,
    model_flags,
    only_lease_files,
    read_rows,
    run_cli,
)

CLEAN_ENV = {"RAY_ADDRESS": None}


# --- the demo, and its output as a dataset ---------------------------------------------------------
@pytest.mark.integration
def test_demo_output_is_a_dataset_readers_can_point_at(tmp_path):
    import duckdb

    work = tmp_path / "here"
    work.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "lnstd", "run"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = work / "lnstd-out"
    # Ray's own warnings, worker logs and tracebacks stay out of the terminal
    assert "Token authentication" not in r.stderr and "(raylet)" not in r.stderr and "WARNING" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("lnstd: ") or "/48 [" in ln for ln in lines), r.stderr  # ours, or the bar
    # one throughput figure: the bar's last rate is the summary's
    bar = re.findall(r"([\d.]+) img/s\]", r.stderr)
    summary = re.search(r"at ([\d.]+) img/s", r.stderr)
    assert bar and summary and bar[-1] == summary.group(1), r.stderr
    assert "random weights" not in r.stderr  # the demo explains the trained toy ViT
    methods = ["gae", "lnstd"]  # the default: the paper's method and the cheap gradient baseline
    rows = read_rows(out)
    assert len(rows) == 48 * len(methods) and {row["method"] for row in rows} == set(methods)
    assert all(row["status"] == "ok" for row in rows)
    # the committed toy ViT knows this task: it gets (almost) every label right
    assert sum(row["correct"] for row in rows if row["method"] == "gae") >= 45
    assert all(os.path.isabs(row["source"]) and os.path.isfile(row["source"]) for row in rows)
    # a reader given the output folder gets exactly the heatmap rows
    table = pq.read_table(out)
    assert table.num_rows == len(rows) and "heatmap" in table.column_names
    for source in (f"'{out}'", f"'{out}/**/*.parquet'"):
        assert duckdb.sql(f"select count(*) from read_parquet({source})").fetchall()[0][0] == len(rows)
    parquet = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert parquet == ["heatmaps/part-00000.parquet"]
    assert all(p.name.startswith("_") for p in out.iterdir() if p.name != "heatmaps")
    # the report from another working directory shows every image
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "lnstd", "report", str(out)], cwd=elsewhere,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    page = (out / "_report.html").read_text()
    assert "source unreadable" not in page and page.count("<img class='g'") == 12 * (1 + len(methods))
    # in a browser at 1280 px: no sideways overflow, no random-weights banner, the agreement matrix
    seen = visit(out / "_report.html", tmp_path / "demo.png", width=1280)
    assert seen.scroll_width <= seen.viewport_width == 1280 and seen.banner is None
    assert seen.agreement_cells == len(methods) ** 2 and seen.console_errors == []


# --- fail early, in one line ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--model", "vit_tinyy_patch16_224"], "unknown timm model 'vit_tinyy_patch16_224'; did you mean"),
        (["--model", "vit_tiny_patch16_224", "--checkpoint", "nope.safetensors"], "checkpoint not found"),
        (["--model", "vit_tiny_patch16_224", "--model-arg", "depthh=2"], "keyword argument 'depthh'"),
        (["--model", "vit_tiny_patch16_224", "--option", "std=divide"], "std must be one of"),
        (["--model", "vit_tiny_patch16_224", "--option", "stdd=2"], "unknown option 'stdd'"),
        (["--model", "vit_tiny_patch16_224", "--methods", "gae", "--option", "lnstd.std=none"],
         "is for method 'lnstd', which is not among"),
        (["--model", "vit_tiny_patch16_224", "--decode", "gpu"], "--decode gpu needs --gpus-per-actor"),
        (["--model", "beit_base_patch16_224", "--model-arg", "depth=1", "--model-arg", "img_size=32",
          "--capture", "fused"], "lnstd: error: --capture: capture='fused' is not available for Beit"),
    ],
)  # fmt: skip
def test_model_methods_and_options_are_checked_before_ray_and_before_writing(
    tmp_path, monkeypatch, no_ray, flags, needle
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(1))
    code, err = cli_in_process("run", "--input", "in", "--output", "out", *flags)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lnstd: error: ") and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written, no output folder


@pytest.mark.integration
def test_a_wrong_model_then_the_right_one_is_not_refused(ckpt, tmp_path):
    """The corrected command starts: the failed one left nothing that claims the output."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(1))
    wrong = ["--model" if f == "--model" else ("vit_tiny_patch16_22" if f == "vit_tiny_patch16_224" else f)
             for f in model_flags(ckpt)]  # fmt: skip
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
            "--cpus-per-actor", "0.5", "--methods", "gae"]  # fmt: skip
    r = run_cli(*args, *wrong, env=CLEAN_ENV)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    r = run_cli(*args, *model_flags(ckpt), env=CLEAN_ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["status"] for row in read_rows(tmp_path / "out", ["status"])] == ["ok"]


@pytest.mark.integration
def test_wrong_paths_for_aggregate_and_report_say_what_is_wrong(tmp_path, no_ray):
    (tmp_path / "empty").mkdir()
    for cmd in ("aggregate", "report"):
        for path in (tmp_path / "missing", tmp_path / "empty"):
            code, err = cli_in_process(cmd, str(path))
            assert code == 2 and err.count("\n") == 1
            assert f"{path}: no lnstd output here (no heatmaps/ folder)" in err


def test_a_bug_is_an_internal_error_and_traceback_shows_it(monkeypatch):
    import lnstd.cli

    monkeypatch.setattr(lnstd.cli, "_cmd_methods", lambda args: 1 / 0)
    code, err = cli_in_process("methods")
    assert code == 1 and "internal error (ZeroDivisionError" in err and "Traceback" not in err
    code, err = cli_in_process("methods", "--traceback")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert "ZeroDivisionError: division by zero\n" in err  # the traceback's last line


@pytest.mark.integration
def test_unschedulable_actors_fail_fast_naming_what_is_missing(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good_image(1))
    base = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *model_flags(ckpt),
            "--no-progress", "--methods", "gae"]  # fmt: skip
    cpus = os.cpu_count()
    cases = [
        (["--cpus-per-actor", str(cpus + 2)], f"an actor needs {cpus + 2} CPUs"),
        (["--gpus-per-actor", "1", "--cpus-per-actor", "0.5"], "and 1 GPUs, but this"),
    ]
    for flags, needle in cases:
        r = run_cli(*base, *flags, env=CLEAN_ENV, timeout=60)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and r.stderr.count("\n") == 2  # the plan line, then the error
    assert only_lease_files(tmp_path / "out")


# --- the shipped job specs run on this machine ------------------------------------------------------
def _write_mat(path: Path, n: int = 2) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = f.create_dataset("/value/img", (n, 1), dtype=h5py.ref_dtype)
        gt_refs = f.create_dataset("/value/gt", (n, 1), dtype=h5py.ref_dtype)
        for i in range(n):
            img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
            mask = np.zeros((40, 56), np.uint8)
            mask[5:20, 10:30] = 1
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            gt = refs.create_dataset(f"gt{i}", data=mask.T)
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = gt.ref
            gt_refs[i, 0] = cell.ref


SPECS = sorted(p.name for p in (ROOT / "jobs" / "specs").glob("*.yaml"))
# The specs written for GPUs (a ViT-B with every method, a Swin-T in bf16) take a minute or more each
# on two CPU cores: their full runs are in -m slow; every spec's flags are checked by default below.
GPU_SPECS = [s for s in SPECS if "gpus-per-actor" in (ROOT / "jobs" / "specs" / s).read_text()]


@pytest.mark.parametrize("spec", SPECS)
def test_shipped_specs_are_valid_configurations(spec):
    """Every flag of every spec parses into a run configuration, and its methods are known."""
    from lnstd.choices import METHODS
    from lnstd.cli import build_parser
    from lnstd.config import RunConfig
    from lnstd.jobs.specs import expand_specs

    args = build_parser().parse_args(expand_specs(["run", "--spec", spec.removesuffix(".yaml")]))
    cfg = RunConfig.from_args(args)
    assert cfg.model and cfg.input and cfg.output
    assert set(cfg.methods) <= set(METHODS)  # [] is "all"
    text = (ROOT / "jobs" / "specs" / spec).read_text()
    assert f"model: {cfg.model}\n" in text and cfg.batch_size == int(text.split("batch-size: ")[1].split()[0])


@pytest.mark.integration
@pytest.mark.parametrize(
    "spec", [pytest.param(s, marks=pytest.mark.slow) if s in GPU_SPECS else s for s in SPECS]
)
def test_shipped_specs_run_here(spec, tmp_path):
    """Each spec runs with only what this machine lacks overridden: data, downloads, GPUs."""
    (tmp_path / "in").mkdir()
    for k in range(2):
        (tmp_path / "in" / f"s{k}.jpg").write_bytes(good_image(2 * k))
    overrides = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-pretrained",
                 "--no-progress", "--no-report"]  # fmt: skip
    if spec.startswith("imagenet-seg"):
        _write_mat(tmp_path / "gtsegs_ijcv.mat")
        overrides[1] = str(tmp_path / "gtsegs_ijcv.mat")
    if "gpus-per-actor" in (ROOT / "jobs" / "specs" / spec).read_text():
        overrides += ["--gpus-per-actor", "0", "--actors", "1", "--cpus-per-actor", "1", "--decode", "cpu"]
    r = run_cli("run", "--spec", spec.removesuffix(".yaml"), *overrides, env=CLEAN_ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert rows and all(row["status"] == "ok" for row in rows)
    assert len({row["image_id"] for row in rows}) == 2


# --- layering and packaging ---------------------------------------------------------------------------
def test_only_the_cli_imports_the_job_layer():
    offenders = []
    for path in (ROOT / "lnstd").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "lnstd":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if re.match(r"^(\.*jobs|lnstd\.jobs)", n)
            ]
    assert offenders == []


def test_users_never_need_the_design_folder():
    hits = []
    for base in ("README.md", "lnstd", "jobs", "docs", "cluster", "benchmarks"):
        for path in [ROOT / base] if base.endswith(".md") else (ROOT / base).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".sh"):
                text = path.read_text()
                hits += [
                    f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"shared/design|METHODS\.md", text)
                ]
    assert hits == []


@pytest.mark.integration
def test_the_wheel_installs_no_generic_top_level_name(tmp_path):
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    r = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("lnstd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lnstd", f"{wheel.name.split('-py3')[0]}.dist-info"}
    assert "lnstd/jobs/attribute.py" in names and "lnstd/jobs/specs/folder-local.yaml" in names
    assert "lnstd/checkpoints/toy_vit.safetensors" in names


def test_explain_and_eval_name_a_wrong_option_in_one_line(no_ray, tmp_path):
    from lnstd.train import toy_checkpoint

    img = tmp_path / "a.png"
    img.write_bytes(good_image(2))
    ckpt = str(toy_checkpoint("vit"))
    explain = [
        "explain",
        str(img),
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp_path / "o"),
        "--option",
        "std=divide",
    ]
    evaluate = ["eval", "--dataset", "toy", "--checkpoint", ckpt, "--n", "2", "--out", str(tmp_path / "e"),
                "--option", "stdd=1"]  # fmt: skip
    for args in (explain, evaluate):
        code, err = cli_in_process(*args)
        assert code == 2 and err.count("\n") == 1, err
        assert "std must be one of" in err or "unknown option 'stdd'" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_capture_fused_on_a_model_without_a_fused_path_names_the_capture_flag(no_ray, tmp_path):
    """BEiT's attention cannot be rebuilt exactly from q and k: the error names --capture, the flag
    the user typed (it used to say --option), in one line, before any picture is drawn."""
    img = tmp_path / "a.png"
    img.write_bytes(good_image(2))
    beit = ["--model", "beit_base_patch16_224", *[f for kv in ("img_size=32", "patch_size=8", "embed_dim=32",
            "depth=1", "num_heads=2", "num_classes=3") for f in ("--model-arg", kv)]]  # fmt: skip
    code, err = cli_in_process("explain", str(img), *beit, "--out", str(tmp_path / "o"), "--capture", "fused")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("lnstd: error: --capture: capture='fused' is not available for Beit"), err
    assert "--option" not in err and not (tmp_path / "o").exists()
    code, err = cli_in_process(
        "explain", str(img), *beit, "--out", str(tmp_path / "o"), "--capture", "unfused"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o" / "beit_base_patch16_224").iterdir())[-1] == "a_strip.png"


_MAIN_REPORTING_IMPORTS = """
import sys
from lnstd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse's own errors
    code = exc.code
print("torch" in sys.modules, "timm" in sys.modules, "ray" in sys.modules, code)
"""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["run", "--methods", "lnstd,nope"],
            "argument --methods: unknown method 'nope'; available: attention,",
        ),
        (["run", "--method", "lnstd"], "unrecognized arguments: --method lnstd"),  # no prefix matching
        (["run", "--batch-sise", "3"], "unrecognized arguments: --batch-sise"),
        (["run", "--input", "nope", "--model", "vit_tiny_patch16_224"], "input folder not found"),
        (
            ["run", "--input", ".", "--model", "vit_tiny_patch16_224", "--option", "stdd"],
            "expected KEY=VALUE",
        ),
        (["run", "--input", ".", "--model", "vit_tiny_patch16_224", "--target", "top3"], "--target must be"),
        (["explain", "nope.jpg", "--model", "vit_tiny_patch16_224", "--out", "o"], "no such image or folder"),
    ],
)
def test_mistakes_that_need_no_model_are_answered_before_torch_is_imported(tmp_path, args, needle):
    """One line, exit 2, and neither torch, timm nor Ray imported when it is said (they take
    seconds to import; a typo must not wait for them)."""
    r = subprocess.run(
        [sys.executable, "-c", _MAIN_REPORTING_IMPORTS, *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.stdout.split() == ["False", "False", "False", "2"], (r.stdout, r.stderr)
    assert r.stderr.startswith("lnstd: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert needle in r.stderr, r.stderr


def test_the_command_line_knows_every_registered_method_without_importing_them():
    from lnstd.choices import METHODS
    from lnstd.methods import list_methods

    assert list(METHODS) == list_methods()


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]])
def test_the_code_is_lint_and_format_clean(check):
    """``ruff check`` and ``ruff format --check`` over the project: the test command (and so CI)
    fails on a lint or format error."""
    ruff = Path(sys.executable).with_name("ruff")
    r = subprocess.run([str(ruff), *check, "lnstd", "jobs", "tests", "benchmarks", "docs"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
