"""Exactly-once, for real: the shard plan, the output lease, per-image faults, unique ids, the one
preprocessing path (centre crop), the report of a label run, output paths, the import path of the
actors, and error reasons. Real Ray, real files, a real S3 endpoint (moto's server)."""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lnstd

from .jobhelpers import (
    ROOT,
    TINY_ARGS,
    TINY_MODEL,
    good_image,
    mask_scores_by_hand,
    model_flags,
    only_lease_files,
    read_rows,
    run_cli,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_ray")]

FAST = ["--no-progress", "--no-report", "--cpus-per-actor", "0.5", "--methods", "gae"]


def pairs(output: Path) -> collections.Counter:
    return collections.Counter(
        (r["image_id"], r["method"]) for r in read_rows(output, ["image_id", "method"])
    )


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).write_bytes(good_image(k + 3 * len(name)))


def interrupt_last_shard(output: Path, shard: int) -> None:
    """The state a crash before shard ``shard``'s commit leaves: its part file absent (commits are
    atomic renames), no _SUCCESS, the plan and the other shards in place."""
    (output / "heatmaps" / f"part-{shard:05d}.parquet").unlink()
    (output / "_SUCCESS").unlink()


# --- 1. the shard plan: resume after the input changed ---------------------------------------------
def test_resume_after_inputs_were_added_and_removed_keeps_exactly_once(ckpt, tmp_path):
    names = [f"img{k:02d}.png" for k in range(20)]
    write_images(tmp_path / "in", names)
    out = tmp_path / "out"
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt),
            "--shard-size", "5", *FAST]  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plan: 20 inputs in 4 shards" in r.stderr
    interrupt_last_shard(out, 3)  # img15..img19 not committed
    # three files that sort first appear; one file of the uncommitted shard and one of a committed
    # shard disappear
    write_images(tmp_path / "in", ["aaa0.png", "aaa1.png", "aaa2.png"])
    (tmp_path / "in" / "img17.png").unlink()
    (tmp_path / "in" / "img02.png").unlink()

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    notices = [ln for ln in r.stderr.splitlines() if "the input changed" in ln]
    assert len(notices) == 1 and "3 added" in notices[0] and "2 removed" in notices[0], r.stderr
    assert "--refresh-input" in notices[0]
    # what the rows below show: the removed input of a committed shard keeps its row
    assert "those in committed shards keep their rows" in notices[0] and "become errors" not in notices[0]
    got = pairs(out)
    assert set(got.values()) == {1}  # no (image, method) twice
    assert {i for i, _ in got} == set(names)  # the plan as recorded: the added three wait
    rows = {r["image_id"]: r for r in read_rows(out, ["image_id", "status", "error"])}
    assert rows["img17.png"]["status"] == "error" and rows["img17.png"]["error"] == "missing at run time"
    assert rows["img02.png"]["status"] == "ok"  # committed before it was removed
    assert "20 images (19 ok, 1 error)" in r.stderr
    assert "resuming: 3 of 4 shards already committed" in r.stderr

    r = run_cli(*args, "--refresh-input")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 added (appended as new shards)" in r.stderr and "plan: 1 new shards (4..4)" in r.stderr
    got = pairs(out)
    assert set(got.values()) == {1}
    assert {i for i, _ in got} == set(names) | {"aaa0.png", "aaa1.png", "aaa2.png"}
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == [f"part-{s:05d}.parquet" for s in range(5)]
    assert (out / "_SUCCESS").exists()
    plan = json.loads((out / "_lnstd" / "plan" / "plan.json").read_text())
    assert plan["inputs"] == 23 and plan["shards"] == 5
    agg = run_cli("aggregate", str(out))
    assert agg.returncode == 0 and "23 images (22 ok, 1 error)" in agg.stdout


def test_resume_on_s3_after_inputs_changed(s3_server, ckpt):
    client = s3_server.client()
    client.create_bucket(Bucket="plan")
    for k in range(10):
        client.put_object(Bucket="plan", Key=f"in/b{k}.png", Body=good_image(k))
    args = ["run", "--input", "s3://plan/in", "--output", "s3://plan/out", *model_flags(ckpt),
            "--shard-size", "4", "--s3-endpoint", s3_server.endpoint, *FAST]  # fmt: skip
    r = run_cli(*args, env=s3_server.env)
    assert r.returncode == 0, r.stderr[-2000:]
    client.delete_object(Bucket="plan", Key="out/heatmaps/part-00002.parquet")  # b8, b9 uncommitted
    client.delete_object(Bucket="plan", Key="out/_SUCCESS")
    client.put_object(Bucket="plan", Key="in/a0.png", Body=good_image(50))
    client.delete_object(Bucket="plan", Key="in/b9.png")
    r = run_cli(*args, "--refresh-input", env=s3_server.env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 added (appended as new shards)" in r.stderr and "1 removed" in r.stderr
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=s3_server.env["AWS_ACCESS_KEY_ID"], secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=s3_server.endpoint.split("://")[1], scheme="http", region="us-east-1",
    )  # fmt: skip
    rows = pq.read_table(
        "plan/out/heatmaps", filesystem=fs, columns=["image_id", "status", "error"]
    ).to_pylist()
    ids = collections.Counter(r["image_id"] for r in rows)
    assert set(ids.values()) == {1} and set(ids) == {f"b{k}.png" for k in range(10)} | {"a0.png"}
    assert next(r for r in rows if r["image_id"] == "b9.png")["error"] == "missing at run time"


def test_a_cluster_whose_nodes_lack_the_storage_credentials_is_one_line(s3_server, ckpt, tmp_path):
    """The driver has credentials, the cluster's node does not (a submitted job on a cluster whose
    worker pods have no role): one line naming the cause, exit 2, nothing attributed (was: exit 1,
    "internal error (CallFailed: ... no AWS credentials ...)")."""
    from .jobhelpers import ray_head

    client = s3_server.client()
    client.create_bucket(Bucket="nocreds")
    client.put_object(Bucket="nocreds", Key="in/a.png", Body=good_image(1))
    with ray_head(1, dict.fromkeys(s3_server.env)) as address:  # a node without the credentials
        r = run_cli("run", "--input", "s3://nocreds/in", "--output", "s3://nocreds/out", *model_flags(ckpt),
                    "--s3-endpoint", s3_server.endpoint, "--address", address, *FAST,
                    env={**s3_server.env, "RAY_ADDRESS": None})  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lnstd: error: an actor could not reach the run's storage ("), last
    assert "no AWS credentials" in last and "every node needs the storage's credentials" in last
    assert client.list_objects_v2(Bucket="nocreds", Prefix="out/heatmaps/")["KeyCount"] == 0
    assert "lnstd-test-secret" not in r.stderr


# --- 2. one bad label loses nothing but itself --------------------------------------------------------
def test_a_bad_label_is_one_error_row_and_the_shard_is_explained(ckpt, tmp_path):
    names = [f"l{k}.png" for k in range(6)]
    write_images(tmp_path / "in", names)
    labels = [0, 1, 5000, 3, -1, "cat"]
    with open(tmp_path / "in" / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label"])
        w.writerows(zip(names, labels))
    base = ["run", "--input", str(tmp_path / "in" / "list.csv"), *model_flags(ckpt), "--target", "label",
            "--shard-size", "6", *FAST]  # fmt: skip
    r = run_cli(*base, "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]  # error rows are results, not a failed job
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "out")}
    assert set(rows) == set(names)
    assert rows["l2.png"]["error"] == rows["l4.png"]["error"] == "label out of range"
    assert rows["l2.png"]["error_detail"] == "5000 (model: 5 classes)"
    assert rows["l5.png"]["error"] == "label 'cat' is not an integer"
    for ok in ("l0.png", "l1.png", "l3.png"):
        assert rows[ok]["status"] == "ok" and rows[ok]["target"] == rows[ok]["label"]
    assert "6 images (3 ok, 3 errors)" in r.stderr
    # the same command again finds every shard committed (no Ray needed) and, asked to, fails on errors
    manifest = (tmp_path / "out" / "_manifest.json").read_text()
    strict = run_cli(*base, "--output", str(tmp_path / "out"), "--fail-on-errors")
    assert strict.returncode == 1 and "6 images (3 ok, 3 errors)" in strict.stderr
    assert "done already" in strict.stderr and "actor 0 ready" not in strict.stderr
    assert (tmp_path / "out" / "_manifest.json").read_text() == manifest  # the real run's record stays


# --- 3. the output lease ------------------------------------------------------------------------------
def _lease(output: Path, **fields) -> None:
    holder = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "since": time.time() - 5,
              "heartbeat": time.time(), "ttl": 60.0, "run_id": "x"}  # fmt: skip
    holder.update(fields)
    (output / "_lnstd").mkdir(parents=True, exist_ok=True)
    (output / "_lnstd" / "lease.json").write_text(json.dumps(holder))


def test_a_held_output_is_refused_in_one_line_and_an_abandoned_lease_is_taken_over(ckpt, tmp_path):
    write_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(ckpt), *FAST]
    _lease(out)  # a live run: this test's own process, heartbeat now
    r = run_cli(*args, "--overwrite")  # --overwrite does not break a live lease
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "is being written by another run" in r.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()}" in r.stderr
    assert not (out / "heatmaps").exists()  # refused before anything was written
    _lease(out, pid=2**22 + 17)  # its process is gone: a killed run (other hosts: test_lease_unit)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    lease = json.loads((out / "_lnstd" / "lease.json").read_text())
    assert lease["released"] and lease["generation"] == 1  # released at the end; the generation stays


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_runs_one_proceeds_the_other_names_the_holder(ckpt, tmp_path, where, request):
    write_images(tmp_path / "in", [f"c{k}.png" for k in range(40)])
    env = None
    extra: list[str] = []
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        s3.client().create_bucket(Bucket="race")
        output, env, extra = "s3://race/out", s3.env, ["--s3-endpoint", s3.endpoint]
    else:
        output = str(tmp_path / "out")
    runs = [["--methods", "gae"], ["--methods", "gae,rollout"]]  # different configurations
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lnstd",
                "run",
                "--input",
                str(tmp_path / "in"),
                "--output",
                output,
                *model_flags(ckpt),
                "--shard-size",
                "4",
                *FAST[:-2],
                *m,
                *extra,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for m in runs
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "is being written by another run" in loser or "holds a run with a different methods" in loser
    winner = next(i for i, (rc, _) in enumerate(results) if rc == 0)
    if where == "local":
        rows = read_rows(tmp_path / "out", ["image_id", "method"])
        run = json.loads((tmp_path / "out" / "_lnstd" / "run.json").read_text())
        manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    else:
        rows = pq.read_table(
            "race/out/heatmaps", filesystem=s3.fs(), columns=["image_id", "method"]
        ).to_pylist()
        c = s3.client()
        run = json.loads(c.get_object(Bucket="race", Key="out/_lnstd/run.json")["Body"].read())
        manifest = json.loads(c.get_object(Bucket="race", Key="out/_manifest.json")["Body"].read())
    methods = runs[winner][1].split(",")
    assert run["identity"]["methods"] == manifest["identity"]["methods"] == methods  # one configuration
    got = collections.Counter((r["image_id"], r["method"]) for r in rows)
    assert set(got.values()) == {1} and len(got) == 40 * len(methods)


def test_lease_unit_local_and_s3(tmp_path, s3_server, monkeypatch):
    from lnstd import storage
    from lnstd.errors import OutputLockedError
    from lnstd.jobs.lease import Lease
    from lnstd.output import Output

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3_server.client().create_bucket(Bucket="leases")
    opts = storage.StorageOptions(s3_endpoint=s3_server.endpoint, region="us-east-1")
    for output in (str(tmp_path / "o"), "s3://leases/o"):
        a, b = Lease(Output(output, opts), ttl=0.8), Lease(Output(output, opts), ttl=0.8)
        a.acquire()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            b.acquire()
        assert a.renew() and not a.lost.is_set()
        a._stop.set()  # a hangs: no more heartbeats
        a._thread.join()
        time.sleep(1.0)  # past the ttl
        b.acquire()  # taken over
        assert not a.renew()  # a finds out at its next renewal
        b.release()
        assert b.holder() is None


# --- 4. unique ids --------------------------------------------------------------------------------------
def test_duplicate_ids_are_refused_up_front_naming_the_rows(ckpt, tmp_path):
    write_images(tmp_path / "in", ["x.png", "y.png", "z.png"])
    rows = [["x.png", ""], ["y.png", "same"], ["z.png", "same"], ["x.png", ""]]
    with open(tmp_path / "in" / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "image_id"])
        w.writerows(rows)
    args = ["run", "--input", str(tmp_path / "in" / "list.csv"), "--output", str(tmp_path / "out"),
            *model_flags(ckpt), *FAST]  # fmt: skip
    t0 = time.time()
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "rows 2 and 3 have the same image_id 'same'" in r.stderr
    assert "rows 1 and 4 have the same image_id 'x.png'" in r.stderr and "--dedupe" in r.stderr
    assert time.time() - t0 < 30 and only_lease_files(tmp_path / "out")  # before Ray; the listing removed
    r = run_cli(*args, "--dedupe")
    assert r.returncode == 0, r.stderr[-2000:]
    ids = collections.Counter(row["image_id"] for row in read_rows(tmp_path / "out", ["image_id"]))
    assert ids == {"x.png": 1, "same": 1}  # empty id -> the uri as written; repeats kept once


# --- 5. centre crop: masks, PNGs and overlays go through the same box ---------------------------------
def test_center_crop_geometry_for_masks_pngs_and_overlays(ckpt, tmp_path):
    w, h = 90, 40  # non-square: the crop keeps the middle 40x40 (crop_pct from timm's config)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), bool)
    mask[5:30, 40:80] = True  # partly outside the crop
    (tmp_path / "in").mkdir()
    img.save(tmp_path / "in" / "wide.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "in" / "wide_mask.png")
    (tmp_path / "in" / "list.csv").write_text("uri,mask_uri\nwide.png,wide_mask.png\n")
    r = run_cli("run", "--input", str(tmp_path / "in" / "list.csv"), "--output", str(tmp_path / "out"),
                *model_flags(ckpt), "--fit", "center-crop", "--save-png", *FAST)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_rows(tmp_path / "out")
    crop_pct = lnstd.load_model(TINY_MODEL, **TINY_ARGS).pretrained_cfg["crop_pct"]
    side = 40 * crop_pct  # the short side scaled to 32 / crop_pct, a 32 x 32 crop of it
    left, top = (w - side) / 2, (h - side) / 2
    assert row["crop_box"] == pytest.approx([left, top, left + side, top + side], abs=1e-4)
    # the mask metrics: the mask cropped by the same box, then at the input size
    cropped = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (32, 32), Image.NEAREST, box=tuple(row["crop_box"])
    )
    heat = np.asarray(row["heatmap"]).reshape(row["grid_h"], row["grid_w"])
    want = mask_scores_by_hand(heat, np.asarray(cropped) > 0)
    for k, v in want.items():
        assert row[k] == pytest.approx(v, abs=1e-5), k
    # the PNG: the original's size, relevance inside the box only (alpha 0 outside)
    png = Image.open(io.BytesIO(row["heatmap_png"]))
    assert png.size == (w, h) and png.mode == "LA"
    alpha = np.asarray(png)[..., 1]
    x0, x1, y0, y1 = round(left), round(left + side), round(top), round(top + side)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    assert (alpha[inside] == 255).all() and (alpha[~inside] == 0).all()
    gray = np.asarray(png)[..., 0][y0:y1, x0:x1].astype(float)
    gh, gw = heat.shape
    hot = np.unravel_index(np.argmax(heat), heat.shape)  # the hottest token lands in its cell of the box
    cell = gray[hot[0] * (y1 - y0) // gh : (hot[0] + 1) * (y1 - y0) // gh,
                hot[1] * (x1 - x0) // gw : (hot[1] + 1) * (x1 - x0) // gw]  # fmt: skip
    assert cell.mean() > gray.mean() + 20
    # the overlay: coloured inside the box, dimmed original outside
    from lnstd.data.preprocess import Geometry

    pic = np.asarray(
        lnstd.viz.overlay(img, torch.tensor(heat), geometry=Geometry(w, h, tuple(row["crop_box"])))
    )
    base = np.asarray(img).astype(float)
    np.testing.assert_allclose(pic[:, : x0 - 1], np.round(base[:, : x0 - 1] * 0.35), atol=1)
    assert np.abs(pic[:, x0 + 1 : x1 - 1] - np.round(base[:, x0 + 1 : x1 - 1] * 0.35)).mean() > 10


# --- 6. the report of a label run where no target is the prediction -----------------------------------
def test_report_renders_when_no_target_equals_the_prediction(tmp_path):
    torch.manual_seed(0)
    model = lnstd.load_model(TINY_MODEL, **TINY_ARGS)
    with torch.no_grad():
        model.head.bias[0] = 100.0  # always predicts class 0
    save_file(model.state_dict(), tmp_path / "biased.safetensors")
    names = [f"r{k}.png" for k in range(5)]
    write_images(tmp_path / "in", names)
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    with open(tmp_path / "in" / "list.csv", "w", newline="") as f:
        f.write("uri,label\n" + "".join(f"{n},{1 + k % 4}\n" for k, n in enumerate(names)) + "bad.png,2\n")
    biased = str(tmp_path / "biased.safetensors")
    flags = [
        biased if f.endswith("tiny.safetensors") else f for f in model_flags(tmp_path / "tiny.safetensors")
    ]
    r = run_cli("run", "--input", str(tmp_path / "in" / "list.csv"), "--output", str(tmp_path / "out"),
                *flags, "--target", "label", "--no-progress", "--cpus-per-actor", "0.5",
                "--methods", "gae,lnstd")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning" not in r.stderr
    rows = read_rows(tmp_path / "out")
    assert all(row["predicted"] == 0 and row["target"] != 0 for row in rows if row["status"] == "ok")
    page = (tmp_path / "out" / "_report.html").read_text()
    assert page.count("<img class='g'") == 5 * 3  # every image, with both methods' overlays
    r = run_cli("report", str(tmp_path / "out"), "--metric", "nope")
    assert r.returncode == 2 and "--metric 'nope'" in r.stderr


# --- 7. output paths -------------------------------------------------------------------------------------
def test_output_path_problems_are_one_line_and_leave_no_temporaries(ckpt, tmp_path):
    write_images(tmp_path / "in", ["p.png"])
    (tmp_path / "afile").write_text("x")
    base = ["run", "--input", str(tmp_path / "in"), *model_flags(ckpt), *FAST]
    for output, needle in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "is a file"),
                           (Path("/sys/lnstd-out"), "cannot write in /sys")):  # fmt: skip
        r = run_cli(*base, "--output", str(output))
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # a report that cannot be written leaves no temporary behind
    from lnstd import storage

    target = tmp_path / "ro" / "r.html"
    target.parent.mkdir()
    (target).mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"page")
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]


# --- 8. the actors import the installed package, wherever the driver stands ----------------------------
def test_running_next_to_a_folder_named_lnstd(ckpt, tmp_path):
    """The parent of a checkout named lnstd (no __init__.py at its top) is a common place to stand;
    Ray puts the driver's folder first on its workers' import path."""
    (tmp_path / "lnstd" / "lnstd").mkdir(parents=True)
    (tmp_path / "lnstd" / "README.md").write_text("a checkout")
    write_images(tmp_path / "in", ["s.png"])
    console = Path(sys.executable).parent / "lnstd"
    r = subprocess.run([str(console), "run", "--input", "in", "--output", "out", *model_flags(ckpt), *FAST],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["status"] for row in read_rows(tmp_path / "out", ["status"])] == ["ok"]
    assert read_rows(tmp_path / "out", ["source"])[0]["source"] == str(tmp_path / "in" / "s.png")


# --- 9. error reasons group ---------------------------------------------------------------------------
def test_error_reasons_are_stable_and_path_free(ckpt, tmp_path):
    from .jobhelpers import bad_files

    files = bad_files()
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    (tmp_path / "in" / "bad" / "truncated2.jpg").write_bytes(good_image(4)[:300])
    r = run_cli(
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *model_flags(ckpt), *FAST
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(tmp_path / "out", ["image_id", "error", "error_detail", "source"])
    reasons = {row["image_id"]: row["error"] for row in rows}
    assert set(reasons.values()) <= {"not an image (unrecognised format)", "corrupt or truncated image",
                                      "empty file", "image too large to decode safely"}  # fmt: skip
    assert reasons["bad/truncated.jpg"] == reasons["bad/truncated2.jpg"] == "corrupt or truncated image"
    for row in rows:
        text = f"{row['error']} {row['error_detail'] or ''}"
        assert str(tmp_path) not in text and " at 0x" not in text and "\n" not in text
        assert row["source"].startswith(str(tmp_path))  # the path lives in source
    agg = run_cli("aggregate", str(tmp_path / "out"))
    assert " images: corrupt or truncated image" in agg.stdout
    assert agg.stdout.count("corrupt or truncated image") == 1
