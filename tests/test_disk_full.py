"""A full disk under the output: one line, exit 2, nothing lost, and the same command finishes the
job once there is room again. The output lives on a real, small tmpfs (4 MiB) filled with a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .jobhelpers import cli_in_process, good_image, model_flags, read_rows, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_ray")]
N = 8
FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae", "--shard-size", "2"]


@pytest.fixture
def disk(tmp_path: Path):
    """A 4 MiB tmpfs (mounting one needs root, as on this project's machines and CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave_kib: int) -> Path:
    """Fill the disk but ``leave_kib`` KiB (tmpfs counts whole 4 KiB pages)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave_kib * 1024, 0))
    return filler


def _job(ckpt: Path, tmp_path: Path, disk: Path) -> tuple[Path, list[str]]:
    (tmp_path / "in").mkdir()
    for k in range(N):
        (tmp_path / "in" / f"i{k}.png").write_bytes(good_image(2 * k + 1))
    out = disk / "out"
    return out, ["run", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt), *FAST]


def _run(args: list[str]) -> tuple[int, str]:
    """The run in a process of its own, as a user's (exit code, stderr)."""
    r = run_cli(*args)
    return r.returncode, r.stderr


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines and lines[-1].startswith("lnstd: error: "), err
    return lines[-1]


def _every_input_once(out: Path) -> None:
    rows = sorted(r["image_id"] for r in read_rows(out, ["image_id"]))
    assert rows == sorted(f"i{k}.png" for k in range(N))
    code, _ = cli_in_process("verify", str(out))
    assert code == 0


def test_the_disk_filling_mid_run_stops_in_one_line_and_the_rerun_finishes_once(ckpt, tmp_path, disk):
    out, args = _job(ckpt, tmp_path, disk)
    filler = _fill(disk, leave_kib=32)  # room for the lease, the plan and one part: not for four
    code, err = _run(args)
    assert code == 2 and "no space left" in _one_error_line(err), err
    assert not (out / "_SUCCESS").exists()
    committed = sorted(p.name for p in (out / "heatmaps").glob("*.parquet"))
    assert 0 < len(committed) < N // 2, committed  # it stopped inside the job, keeping what it wrote
    filler.unlink()
    code, err = _run(args)
    assert code == 0 and f"resuming: {len(committed)} of 4 shards already committed" in err, err
    _every_input_once(out)


def test_a_full_disk_under_a_finished_output_is_one_line_and_loses_nothing(ckpt, tmp_path, disk):
    """Was: exit 1, "internal error (OSError: [Errno 28] No space left on device)" (claiming the lease)."""
    out, args = _job(ckpt, tmp_path, disk)
    code, err = _run(args)
    assert code == 0, err
    filler = _fill(disk, leave_kib=0)
    code, err = _run(args)
    assert code == 2, err
    assert _one_error_line(err) == (
        "lnstd: error: no space left on the device: make room and run the same command again "
        "(it resumes from what was committed)"
    )
    filler.unlink()
    _every_input_once(out)
    assert (out / "_SUCCESS").exists()
    code, err = _run(args)
    assert code == 0, err
