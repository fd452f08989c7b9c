"""Names are data: any name a file system allows is an input (bytes that are not UTF-8,
``x.mat#1.png``), a FIFO is an error row and no hang, an unreadable subfolder is counted in the plan
notice, and a manifest's ``./a.png`` and ``a.png`` are one input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from lnstd import storage
from lnstd.data import mat_ref, open_source

from .jobhelpers import (
    cli_in_process,
    good_image,
    model_flags,
    only_lease_files,
    read_rows,
    run_cli,
)

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)

FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae"]


def test_a_local_name_in_any_bytes_round_trips_through_its_utf8_form(tmp_path):
    names = [b"plain.png", b"bad\xffname.png", b"caf\xc3\xa9.png", b"100%.png", b"sp ace\xfe%41.png", b"\x80"]
    for raw in names:
        path = os.path.join(os.fsdecode(str(tmp_path).encode()), os.fsdecode(raw))
        text = storage.local_uri(path)
        text.encode("utf-8")  # Arrow and Parquet can carry it
        assert storage.resolve(text)[1] == path  # read back to the same bytes
        if b"\xff" not in raw and b"\xfe" not in raw and b"\x80" not in raw:
            assert text == path  # UTF-8 names are unchanged
    assert storage.local_uri(os.fsdecode(b"/d/bad\xffname.png")) == "file:///d/bad%FFname.png"


def test_ids_stay_as_written_under_a_root_whose_name_is_not_utf8(tmp_path):
    root = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"in\xff"))
    os.mkdir(root)
    for raw in (b"a b.png", b"x\xfe.png"):
        with open(os.path.join(os.fsencode(root), raw), "wb") as f:
            f.write(good_image(1))
    items = {it.image_id: it.uri for it in open_source(root).items()}
    assert items == {
        "a b.png": f"file://{tmp_path}/in%FF/a%20b.png",
        "x%FE.png": f"file://{tmp_path}/in%FF/x%FE.png",
    }
    assert all(storage.read_bytes(uri) == good_image(1) for uri in items.values())


def test_mat_references_exist_only_for_mat_files():
    assert mat_ref("/data/gtsegs_ijcv.mat#12") == ("/data/gtsegs_ijcv.mat", 12)
    assert mat_ref("/data/X.MAT#0") == ("/data/X.MAT", 0)
    for uri in ("/in/x.mat#1.png", "/in/x.mat#", "/in/x.mat#a", "/in/xmat#1", "s3://b/y.png"):
        assert mat_ref(uri) is None


def test_a_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    t0 = time.time()
    with pytest.raises(storage.NotRegularFileError, match="not a regular file"):
        storage.read_bytes(str(fifo))  # opening it for reading would wait for a writer, forever
    assert time.time() - t0 < 5
    (tmp_path / "a.png").write_bytes(good_image(1))
    items = {it.image_id: it.problem for it in open_source(str(tmp_path)).items()}
    assert items == {"a.png": None, "pipe.jpg": "not a regular file"}


def test_an_unreadable_subfolder_is_counted_in_the_plan_notice():
    """Root reads every folder, so the listing runs as an unprivileged user (nobody) in a child."""
    base = Path(tempfile.mkdtemp(prefix="lnstd-perm-"))
    try:
        base.chmod(0o755)
        for sub, mode in (("open", 0o755), ("closed", 0o700), ("deep/closed2", 0o700)):
            (base / sub).mkdir(parents=True)
            (base / sub / "x.png").write_bytes(good_image(1))
            (base / sub).chmod(mode)
        (base / "deep").chmod(0o755)
        (base / "top.png").write_bytes(good_image(2))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, list, report, exit
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                src = open_source(str(base))
                ids = [it.image_id for it in src.items()]
                os.write(write, json.dumps({"ids": ids, "notice": src.notice()}).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            got = json.loads(f.read() or b"{}")
        os.waitpid(pid, 0)
        assert got["ids"] == ["top.png", "open/x.png"]
        assert got["notice"].startswith("2 subfolders could not be read, their images are not in the plan")
        assert "'closed'" in got["notice"]
        # as root every folder is read, and nothing is said
        src = open_source(str(base))
        assert len(list(src.items())) == 4 and src.notice() == ""
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)


def _manifest(folder: Path, uris: list[str]) -> Path:
    path = folder / "list.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri"])
        w.writerows([u] for u in uris)
    return path


def test_a_manifests_paths_are_normalised_before_the_duplicate_check(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(good_image(1))
    path = _manifest(tmp_path, ["./a.png", "a.png", "sub/../a.png", str(tmp_path / "a.png")])
    uris = {it.uri for it in open_source(str(path)).items()}
    assert uris == {str(tmp_path / "a.png")}  # one file, one uri
    code, err = cli_in_process("run", "--input", str(path), "--output", str(tmp_path / "out"),
                               "--model", "vit_tiny_patch16_224", *FAST)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "rows 1 and 2 have the same uri" in err and "--dedupe" in err
    assert only_lease_files(tmp_path / "out")  # the listing was removed under the lease


@pytest.mark.integration
def test_hostile_names_are_one_row_each_and_the_others_are_ok(ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    png = good_image(1)
    (folder / "a.png").write_bytes(png)
    (folder / "b.jpg").write_bytes(good_image(2))
    with open(os.path.join(bytes(folder), b"bad\xffname.png"), "wb") as f:
        f.write(png)  # the same pixels as a.png under a name that is not UTF-8
    (folder / "x.mat#1.png").write_bytes(png)  # a PNG, not a .mat reference
    os.mkfifo(folder / "pipe.jpg")  # listed as not a regular file
    os.symlink(folder / "pipe.jpg", folder / "link.jpg")  # a link is judged when the actor reads it
    # RAY_BACKEND_LOG_LEVEL makes Ray's native logger say so on the driver's file descriptor 2
    r = run_cli("run", "--input", str(folder), "--output", str(tmp_path / "out"), *model_flags(ckpt), *FAST,
                env={"RAY_BACKEND_LOG_LEVEL": "info"}, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "internal error" not in r.stderr
    assert all(line.startswith("lnstd: ") for line in r.stderr.splitlines()), r.stderr  # no native noise
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "out")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "a.png": "ok", "b.jpg": "ok", "bad%FFname.png": "ok", "x.mat#1.png": "ok",
        "pipe.jpg": "error", "link.jpg": "error",
    }  # fmt: skip
    assert rows["pipe.jpg"]["error"] == rows["link.jpg"]["error"] == "not a regular file"
    assert rows["bad%FFname.png"]["source"] == f"file://{folder}/bad%FFname.png"
    for k in ("bad%FFname.png", "x.mat#1.png"):  # the file was found and read: a.png's pixels
        np.testing.assert_allclose(rows[k]["heatmap"], rows["a.png"]["heatmap"], atol=1e-6)
