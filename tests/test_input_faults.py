"""Faults of the input a user can act on, through the real CLI (issue 26, items 4, 6, 7): a 100 GB
sparse PNG, a symbolic link loop and two names that escaped to one id, among good images, are one
row each and the run exits 0; a .mat that is not one is exit 2 in one line naming it; a .mat whose
references are bad gives those images error rows."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pytest

from .jobhelpers import cli_in_process, good_image, model_flags, read_rows, run_cli, tiny_checkpoint
from .test_input_limits import GB, TOO_LARGE, sparse_png

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.integration
def test_a_huge_sparse_png_a_link_loop_and_escaped_twins_are_one_row_each(ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        (folder / f"good{k}.png").write_bytes(good_image(2 * k + 1))
    sparse_png(folder / "huge.png", 100_000, 100_000, 100 * GB)
    os.symlink("loop.png", folder / "loop.png")  # a link to itself: ELOOP on every access
    for raw in (b"bad\xffname.png", b"bad%FFname.png"):
        with open(os.path.join(bytes(folder), raw), "wb") as f:
            f.write(good_image(7))
    r = run_cli("run", "--input", str(folder), "--output", str(tmp_path / "out"), *model_flags(ckpt), *FAST,
                timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "internal error" not in r.stderr
    rows = read_rows(tmp_path / "out")
    ids = [row["image_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 7  # every input once (one method)
    by_id = {row["image_id"]: row for row in rows}
    names = sorted(urllib.parse.unquote_to_bytes(i) for i in ids)
    assert names == sorted([b"good0.png", b"good1.png", b"good2.png", b"huge.png", b"loop.png",
                            b"bad\xffname.png", b"bad%FFname.png"])  # fmt: skip
    assert by_id["huge.png"]["status"] == "error" and by_id["huge.png"]["error"] == TOO_LARGE
    assert by_id["loop.png"]["status"] == "error" and by_id["loop.png"]["error"] == "unreadable"
    assert "symbolic links" in by_id["loop.png"]["error_detail"]
    ok = {i for i, row in by_id.items() if row["status"] == "ok"}
    assert ok == {"good0.png", "good1.png", "good2.png", "bad%FFname.png", "bad%25FFname.png"}
    np.testing.assert_allclose(by_id["bad%FFname.png"]["heatmap"], by_id["bad%25FFname.png"]["heatmap"])


def test_a_mat_input_that_is_not_one_is_refused_in_one_line_naming_it(ckpt, tmp_path):
    text = tmp_path / "notes.mat"
    text.write_text("these are not the images you are looking for\n")
    wrong = tmp_path / "wrong.mat"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("value/other", data=np.zeros(3))
    numbers = tmp_path / "numbers.mat"
    with h5py.File(numbers, "w") as f:  # the right names, but numbers where references belong
        f.create_dataset("/value/img", data=np.zeros((2, 1)))
        f.create_dataset("/value/gt", data=np.zeros((2, 1)))
    for path, says in ((text, "is not a MATLAB v7.3 (HDF5) file"), (wrong, "no dataset /value/img"),
                       (numbers, "/value/img is not an (n, 1) array of object references")):  # fmt: skip
        out = tmp_path / f"out-{path.stem}"
        args = ["run", "--input", str(path), "--output", str(out), *model_flags(ckpt), *FAST]
        if path is text:  # one through a fresh process; the same main() in this one for the others
            r = run_cli(*args)
            code, err = r.returncode, r.stderr
        else:
            code, err = cli_in_process(*args)
        assert code == 2, err[-2000:]
        assert err.count("\n") == 1 and str(path) in err and says in err, err


def write_bad_refs(path: Path) -> None:
    """gtsegs' layout with 4 samples, of which only sample 0 is sound: sample 1's mask cell holds
    numbers (h5py: TypeError), sample 2's image is a group, sample 3's a 1-D array."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = f.create_dataset("/value/img", (4, 1), dtype=h5py.ref_dtype)
        gt_refs = f.create_dataset("/value/gt", (4, 1), dtype=h5py.ref_dtype)
        for i in range(4):
            img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            gt = refs.create_dataset(f"gt{i}", data=np.ones((30, 40), np.uint8).T)
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = gt.ref
            gt_refs[i, 0] = cell.ref
        gt_refs[1, 0] = refs.create_dataset("numbers", data=np.zeros((1, 1))).ref
        img_refs[2, 0] = refs.ref
        img_refs[3, 0] = refs.create_dataset("flat", data=np.zeros(5, np.uint8)).ref


@pytest.mark.integration
@pytest.mark.slow  # a whole job, about 25 s
def test_a_mat_with_bad_references_gives_those_images_error_rows(ckpt, tmp_path):
    mat = tmp_path / "gtsegs_ijcv.mat"
    write_bad_refs(mat)
    r = run_cli("run", "--input", str(mat), "--output", str(tmp_path / "out"), *model_flags(ckpt), *FAST,
                timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["image_id"]: row for row in read_rows(tmp_path / "out")}
    assert {i: row["status"] for i, row in rows.items()} == {
        "gtsegs_ijcv.mat#00000": "ok", "gtsegs_ijcv.mat#00001": "error",
        "gtsegs_ijcv.mat#00002": "error", "gtsegs_ijcv.mat#00003": "error",
    }  # fmt: skip
    assert {rows[f"gtsegs_ijcv.mat#{i:05d}"]["error"] for i in (1, 2, 3)} == {"bad .mat entry"}
    assert "TypeError" in rows["gtsegs_ijcv.mat#00001"]["error_detail"]
