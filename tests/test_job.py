"""The batch job end to end: real Ray (local cluster), real Parquet, a real S3 endpoint (moto server)."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lnstd

from .jobhelpers import (
    ROOT,
    TINY_ARGS,
    TINY_MODEL,
    bad_files,
    cli_in_process,
    good_image,
    model_flags,
    read_rows,
    run_cli,
)
from .reference import reference_heatmap

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_ray")]  # Ray, S3, the CLI

FAST = ["--no-progress", "--cpus-per-actor", "0.5"]


def write_folder(folder: Path, n: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"sub{i % 3}/{i:04d}.{'png' if i % 2 else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(good_image(i))
        names.append(name)
    return names


def reference_input(data: bytes, cfg: dict, size: int = 32) -> torch.Tensor:
    """The model input, made with PIL alone from the model's timm config: JPEG draft to at least
    the input size, bicubic resize of the whole image, the config's mean and std (independent of
    lnstd's preprocessing)."""
    assert cfg["interpolation"] == "bicubic"
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).astype(np.float32))


def reference_heatmaps(ckpt: Path, payloads: dict[str, bytes], method: str) -> dict[str, np.ndarray]:
    """The float64, one-image-at-a-time literal reference of the method on the same bytes."""
    model = lnstd.load_model(TINY_MODEL, checkpoint=ckpt, **TINY_ARGS)
    return {
        k: reference_heatmap(model, reference_input(data, model.pretrained_cfg)[None], method)
        .detach()
        .flatten()
        .numpy()
        for k, data in payloads.items()
    }


def test_s3_end_to_end_with_bad_inputs(s3_server, ckpt):
    client = s3_server.client()
    client.create_bucket(Bucket="data")
    good = {}
    for i in range(190):
        key = f"in/cls{i % 4}/{i:04d}.{'png' if i % 2 else 'jpg'}"
        good[key[3:]] = good_image(i)
    bad = {k: v for k, v in bad_files().items()}
    for name, data in {**good, **bad}.items():
        client.put_object(Bucket="data", Key=f"in/{name}", Body=data)

    r = run_cli(
        "run", "--input", "s3://data/in", "--output", "s3://data/out", *model_flags(ckpt),
        "--methods", "gae,lnstd,attention", "--shard-size", "64", "--batch-size", "16",
        "--s3-endpoint", s3_server.endpoint, *FAST, env=s3_server.env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "200 images" in r.stderr

    fs = pafs.S3FileSystem(
        access_key=s3_server.env["AWS_ACCESS_KEY_ID"], secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=s3_server.endpoint.split("://")[1], scheme="http", region="us-east-1",
    )  # fmt: skip
    table = pq.read_table("data/out/heatmaps", filesystem=fs)
    rows = table.to_pylist()
    pairs = collections.Counter((r["image_id"], r["method"]) for r in rows)
    assert set(pairs.values()) == {1}, "an (image, method) pair was written twice"
    assert {i for i, _ in pairs} == set(good) | set(bad)
    assert len(rows) == 200 * 3
    errors = {r["image_id"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == set(bad)
    assert all(e and "\n" not in e for e in errors.values())
    assert "too large" in errors["bad/huge.png"]
    assert all(r["heatmap"] is not None and len(r["heatmap"]) == 16 for r in rows if r["status"] == "ok")

    for method in ("gae", "lnstd"):
        ref = reference_heatmaps(ckpt, good, method)
        got = {
            r["image_id"]: np.asarray(r["heatmap"])
            for r in rows
            if r["method"] == method and r["status"] == "ok"
        }
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=0)

    listing = {o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="out/")["Contents"]}
    assert {"out/_SUCCESS", "out/_manifest.json", "out/_lnstd/run.json", "out/_report.html"} <= listing
    lease = json.loads(client.get_object(Bucket="data", Key="out/_lnstd/lease.json")["Body"].read())
    assert lease["released"] and lease["generation"] == 1  # released at the end (the generation stays)
    report = client.get_object(Bucket="data", Key="out/_report.html")["Body"].read().decode()
    assert report.count("data:image/jpeg;base64,") >= 12 and "source unreadable" not in report
    assert all(k.startswith("out/") for k in listing)
    manifest = client.get_object(Bucket="data", Key="out/_manifest.json")["Body"].read().decode()
    meta = json.dumps({k.decode(): v.decode() for k, v in table.schema.metadata.items()})
    for secret in (s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"]):
        assert secret not in manifest and secret not in meta and secret not in r.stderr
    assert json.loads(manifest)["counts"]["errors"] == 10

    agg = run_cli("aggregate", "s3://data/out", "--s3-endpoint", s3_server.endpoint, env=s3_server.env)
    assert agg.returncode == 0, agg.stderr
    assert "200 images (190 ok, 10 errors)" in agg.stdout
    with fs.open_input_stream("data/out/_aggregate/summary.csv") as f:
        summary = pacsv.read_csv(f).to_pylist()
    for method in ("gae", "lnstd", "attention"):
        probs = [r["probability"] for r in rows if r["method"] == method and r["status"] == "ok"]
        row = next(s for s in summary if s["method"] == method and s["metric"] == "probability")
        assert row["count"] == 190
        assert row["mean"] == pytest.approx(float(np.mean(probs)), rel=1e-5)


def _wait_parts(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        parts = len(list((folder / "heatmaps").glob("part-*.parquet")))
        if parts >= n or proc.poll() is not None:
            return parts
        time.sleep(0.02)
    raise AssertionError("no progress")


def _row_set(output: Path) -> collections.Counter:
    rows = read_rows(output, ["image_id", "method", "heatmap", "status"])
    return collections.Counter((r["image_id"], r["method"], tuple(r["heatmap"] or ())) for r in rows)


def test_driver_sigkill_then_rerun_finishes_without_duplicates(ckpt, tmp_path):
    write_folder(tmp_path / "in", 160)
    args = ["run", "--input", str(tmp_path / "in"), *model_flags(ckpt), "--methods", "gae,rollout",
            "--shard-size", "4", "--batch-size", "4", *FAST]  # fmt: skip
    ref = run_cli(*args, "--output", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lnstd", *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        parts = _wait_parts(out, 5, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run
        proc.wait()
    finally:
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and the local cluster it started with it
    committed = len(list((out / "heatmaps").glob("part-*.parquet")))
    assert parts >= 5 and committed < 40, "the driver was not killed mid-run"
    assert not (out / "_SUCCESS").exists()

    again = run_cli(*args, "--output", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "160 images (160 ok, 0 errors)" in again.stderr  # totals include the committed shards
    manifest = json.loads((out / "_manifest.json").read_text())["counts"]
    assert manifest["shards_skipped"] >= committed and manifest["ok"] == 160
    got, want = _row_set(out), _row_set(tmp_path / "ref")
    assert set(got.values()) == {1}
    assert got == want
    assert not [p for p in (out / "heatmaps").iterdir() if ".tmp-" in p.name]


def test_killed_actor_is_replaced_and_the_job_completes(ckpt, tmp_path):
    names = write_folder(tmp_path / "in", 400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lnstd", "run", "--input", str(tmp_path / "in"), "--output",
           str(out), *model_flags(ckpt), "--methods", "gae", "--shard-size", "4", "--batch-size", "4",
           *FAST]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    shown: list[str] = []  # stdout (Ray's driver prints the raylet's "A worker died ..." there)
    threading.Thread(target=lambda: shown.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 120
        pid = None
        while pid is None and time.time() < deadline:
            for ln in list(lines):
                if "actor 0 ready (pid " in ln:
                    pid = int(ln.split("(pid ")[1].split(",")[0])
            time.sleep(0.05)
        assert pid, "".join(lines)
        parts = _wait_parts(out, 3, proc)
        assert parts < 100, "the job finished before the actor could be killed"
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, "".join(lines)[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    # the loss is told in one line of ours (was: Ray's coloured multi-line raylet diagnostic, and a
    # "shard N failed (...)" line quoting Ray's troubleshooting guide)
    assert shown == [] and not [ln for ln in lines if "raylet" in ln or "\x1b[" in ln], lines
    lost = [ln for ln in lines if "actor lost" in ln or "failed (" in ln]
    said = r"lnstd: actor lost on shard \d+; replacing it \(The actor is dead because its worker process "
    said += r"has died\)\n"
    assert 1 <= len(lost) <= 2 and all(re.fullmatch(said, ln) for ln in lost), lost  # and a call queued on it
    rows = read_rows(out, ["image_id", "status"])
    ids = collections.Counter(r["image_id"] for r in rows)
    assert set(ids) == set(names) and set(ids.values()) == {1}
    assert not [p for p in (out / "heatmaps").iterdir() if p.name != f"part-{p.name[5:10]}.parquet"]
    assert all(r["status"] == "ok" for r in rows)
    assert (out / "_SUCCESS").exists()


def test_driver_memory_does_not_grow_with_the_dataset(ckpt, tmp_path):
    rss = {}
    for n in (60, 300):
        write_folder(tmp_path / f"in{n}", n)
        r = run_cli("run", "--input", str(tmp_path / f"in{n}"), "--output", str(tmp_path / f"out{n}"),
                    *model_flags(ckpt), "--methods", "gae", "--shard-size", "15", *FAST)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        rss[n] = json.loads((tmp_path / f"out{n}" / "_manifest.json").read_text())["driver_peak_rss_mb"]
    assert rss[300] <= 1.2 * rss[60], rss


def test_other_configuration_is_refused_unless_overwrite(ckpt, tmp_path):
    write_folder(tmp_path / "in", 4)
    base = [
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        *model_flags(ckpt),
        *FAST,
    ]
    assert run_cli(*base, "--methods", "gae").returncode == 0
    r = run_cli(*base, "--methods", "gae,lnstd")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("lnstd: error:") and "methods" in r.stderr
    r = run_cli(*base, "--methods", "gae,lnstd", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {row["method"] for row in read_rows(tmp_path / "out", ["method"])} == {"gae", "lnstd"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--batch-size", "many"], "--batch-size"),
        (["run", "--bogus"], "--bogus"),
        (["run", "--input", "somewhere"], "--model is required"),
        (["run", "--model", "vit_tiny_patch16_224"], "--input is required"),
        (["run", "--input", "x", "--model", "m", "--methods", "gae,nope"], "unknown method 'nope'"),
        (["run", "--input", "x", "--model", "m", "--target", "best"], "--target"),
        (["run", "--input", "/nonexistent/folder", "--model", "vit_tiny_patch16_224", "--output",
          "/tmp/x-out"], "input folder not found"),
    ],
)  # fmt: skip
def test_wrong_flags_name_the_flag(args, needle):
    code, err = cli_in_process(*args)
    assert code == 2
    assert needle in err


def test_missing_credentials_say_which(tmp_path):
    env = {k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    r = run_cli(
        "run", "--input", "s3://b/in", "--output", "s3://b/out", "--model", "vit_tiny_patch16_224", env=env
    )
    assert r.returncode == 2 and "AWS_ACCESS_KEY_ID" in r.stderr
    env["AWS_ACCESS_KEY_ID"] = "x"
    r = run_cli(
        "run", "--input", "s3://b/in", "--output", "s3://b/out", "--model", "vit_tiny_patch16_224", env=env
    )
    assert r.returncode == 2 and "AWS_SECRET_ACCESS_KEY is not" in r.stderr


def test_topk_targets_png_column_and_partial_masks(ckpt, tmp_path):
    """--target topk:2 writes one row per image x method x class; --save-png at the image's size;
    ``completeness`` is filled for attnlrp only."""
    import csv
    import io

    from PIL import Image

    names = write_folder(tmp_path / "in", 6)
    with open(tmp_path / "in" / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label", "mask_uri"])
        for k, n in enumerate(names):
            size = Image.open(tmp_path / "in" / n).size
            mask = Image.new("L", size, 0)
            mask.paste(255, (0, 0, size[0] // 2, size[1] // 2))
            mask.save(tmp_path / "in" / f"m{k}.png")
            w.writerow([n, k % 5, f"m{k}.png" if k % 2 else ""])
    r = run_cli("run", "--input", str(tmp_path / "in" / "list.csv"), "--output", str(tmp_path / "out"),
                *model_flags(ckpt), "--methods", "gae,gradcam,attnlrp", "--target", "topk:2", "--save-png",
                "--batch-size", "4", *FAST)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6 * 3 * 2
    assert len({(r["image_id"], r["method"], r["target"]) for r in rows}) == 36
    for row in rows:
        assert (row["completeness"] is not None) == (row["method"] == "attnlrp")
        assert row["method"] != "attnlrp" or 0 < abs(row["completeness"]) < 10
    for row in rows:
        png = Image.open(io.BytesIO(row["heatmap_png"]))
        assert png.size == (row["width"], row["height"])
        with_mask = names.index(row["image_id"]) % 2 == 1
        assert (row["foreground_iou"] is not None) == with_mask
        assert row["correct"] == (row["predicted"] == row["label"])
    by_image = collections.defaultdict(set)
    for row in rows:
        by_image[(row["image_id"], row["method"])].add(row["target"])
    assert all(len(t) == 2 for t in by_image.values())
