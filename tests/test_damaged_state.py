"""A damaged output is the user's error: a corrupt plan, run record, plan part or manifest is one
line naming the file and what to do (exit 2), never an internal error; --overwrite replaces a
damaged run record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .jobhelpers import cli_in_process, good_image, model_flags, read_rows, run_cli

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae"]


@pytest.fixture(scope="module")
def finished(ckpt, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished run's output (3 images in 2 shards) and the arguments that made it: made by
    --overwrite over a garbage run record (which it replaces; it used to be an internal error)."""
    base = tmp_path_factory.mktemp("finished")
    (base / "in").mkdir()
    for k in range(3):
        (base / "in" / f"i{k}.png").write_bytes(good_image(2 * k + 1))
    (base / "out" / "_lnstd").mkdir(parents=True)
    (base / "out" / "_lnstd" / "run.json").write_bytes(b"{garbage")
    args = ["--input", str(base / "in"), *model_flags(ckpt), *FAST, "--shard-size", "2"]
    r = run_cli("run", "--output", str(base / "out"), *args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((base / "out" / "_lnstd" / "run.json").read_text())
    assert record["identity"]["methods"] == ["gae"]
    ids = sorted(r["image_id"] for r in read_rows(base / "out", ["image_id"]))
    assert ids == ["i0.png", "i1.png", "i2.png"]
    return base / "out", args


def _damage(finished, tmp_path: Path, name: str, data: bytes | None) -> tuple[Path, list[str]]:
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    if data is None:
        (out / name).unlink()
    else:
        (out / name).write_bytes(data)
    return out, finished[1]


def _plan_part(finished) -> str:
    plan = json.loads((finished[0] / "_lnstd/plan/plan.json").read_text())
    return "_lnstd/plan/" + plan["parts"][0]["name"]


CASES = {
    "truncated plan": ("_lnstd/plan/plan.json", lambda f: (f[0] / "_lnstd/plan/plan.json").read_bytes()[:40]),
    "empty plan": ("_lnstd/plan/plan.json", lambda f: b""),
    "plan without its shards": ("_lnstd/plan/plan.json", lambda f: b'{"version": 1, "input": "x"}'),
    "garbage run record": ("_lnstd/run.json", lambda f: b"\x00\xff garbage"),
    "incomplete run record": ("_lnstd/run.json", lambda f: b'{"run_id": "abc"}'),
    "run record not an object": ("_lnstd/run.json", lambda f: b"[1, 2]"),
    "missing plan part": (None, lambda f: None),
    "truncated plan part": (None, lambda f: (f[0] / _plan_part(f)).read_bytes()[:100]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_run_state_is_the_users_error_in_one_line(finished, tmp_path, case):
    name, data = CASES[case]
    name = name or _plan_part(finished)
    out, args = _damage(finished, tmp_path, name, data(finished))
    code, err = cli_in_process("run", "--output", str(out), *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lnstd: error: "), err
    assert f"{out}/{name} is " in err  # names the file
    assert "--overwrite" in err and f"delete {out}/_lnstd/" in err  # and what to do
    assert "internal error" not in err


@pytest.mark.integration
def test_a_garbage_manifest_is_the_users_error_when_the_report_reads_it(finished, tmp_path):
    out, _ = _damage(finished, tmp_path, "_manifest.json", b"\x89PNG not json")
    code, err = cli_in_process("report", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out}/_manifest.json is damaged" in err and "rerun the same lnstd run" in err


# --- fuzz: every state file, every kind of damage ----------------------------------------------------
def _lie(data: bytes) -> bytes:
    """The same JSON record with counts that disagree with the parts."""
    d = json.loads(data)
    if "counts" in d:
        d["counts"] = {**d["counts"], "images": d["counts"]["images"] + 5, "ok": d["counts"]["ok"] + 5}
    if "shards" in d:
        d["shards"] += 1
        d["inputs"] += 3
    return json.dumps(d).encode()


DAMAGES = {
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)]),
    "wrong type": lambda path: path.write_bytes(b"[1, 2, 3]"),
    "a directory": lambda path: (path.unlink(), path.mkdir()),
    "lying counts": lambda path: path.write_bytes(_lie(path.read_bytes())),
}
STATE_FILES = [
    "_lnstd/run.json",
    "_lnstd/plan/plan.json",
    "PLAN_PART",
    "_lnstd/lease.json",
    "_lnstd/lease.lock",
    "_manifest.json",
    "_SUCCESS",
    "heatmaps/part-00000.parquet",
]
# The default run takes a folder in place of four of the files (every reader meets a folder
# where a file should be) and the lying records; -m slow takes the whole matrix.
QUICK = {
    ("a directory", f)
    for f in ("_lnstd/run.json", "_manifest.json", "_SUCCESS", "heatmaps/part-00000.parquet")
}
QUICK |= {("lying counts", "_manifest.json"), ("lying counts", "_lnstd/plan/plan.json")}
QUICK |= {("empty", "_lnstd/lease.json"), ("missing", "_lnstd/run.json")}  # each named in its line


def _fuzz_cases():
    for damage in DAMAGES:
        for name in STATE_FILES:
            if damage == "lying counts" and name not in ("_manifest.json", "_lnstd/plan/plan.json"):
                continue
            marks = [pytest.mark.integration] + ([] if (damage, name) in QUICK else [pytest.mark.slow])
            yield pytest.param(name, damage, marks=marks, id=f"{damage}-{name}")


@pytest.mark.parametrize(("name", "damage"), list(_fuzz_cases()))
def test_a_damaged_state_file_is_healed_or_one_line_never_an_internal_error(finished, tmp_path, name, damage):
    name = _plan_part(finished) if name == "PLAN_PART" else name
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    DAMAGES[damage](out / name)
    r = run_cli("run", "--output", str(out), *finished[1])  # healing runs Ray: a process of its own
    code, err = r.returncode, r.stderr
    assert code in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err, err
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith("lnstd: error: ") and name.split("/")[-1] in last, err
        return
    ids = sorted(r["image_id"] for r in read_rows(out, ["image_id"]))
    assert ids == ["i0.png", "i1.png", "i2.png"]  # healed: each input once (one method)
    assert (out / "_SUCCESS").is_file()
