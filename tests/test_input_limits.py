"""Per-image limits before decode (issue 26, item 6): a file whose size or header promises more
than the decode limit is an error row after reading its header only, and an image whose decoding
runs out of memory is that image's error row, never the shard's."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from lnstd import storage
from lnstd.config import RunConfig
from lnstd.data import DecodeError, open_source
from lnstd.data.decode import HEAD_BYTES, check_limits, max_file_bytes
from lnstd.data.read import read_image
from lnstd.jobs.worker import ShardWorker
from lnstd.output import Output
from lnstd.plan import Plan

from .jobhelpers import ROOT, TINY_ARGS, TINY_MODEL, good_image, tiny_checkpoint

GB = 2**30
TOO_LARGE = "image too large to decode safely"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (8-bit RGB): all a reader needs to know its size."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def sparse_png(path: Path, width: int, height: int, size: int) -> None:
    """A real PNG header, then zeros up to ``size`` bytes, sparse (no disk used)."""
    path.write_bytes(png_header(width, height))
    os.truncate(path, size)


def flat_png(width: int, height: int) -> bytes:
    """A valid, fully decodable black RGB PNG, compressed row by row (a few hundred KB)."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return png_header(width, height) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _rchar() -> int:
    """Bytes this process has read through read(2) so far."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_check_limits_refuses_from_the_size_or_the_header_and_lets_the_rest_through():
    default = Image.MAX_IMAGE_PIXELS
    assert max_file_bytes(default) == 16 * default + 64 * 2**20
    with pytest.raises(DecodeError, match=TOO_LARGE) as exc:
        check_limits(png_header(100_000, 100_000), 100 * GB)  # both
    with pytest.raises(DecodeError, match=TOO_LARGE) as exc:
        check_limits(png_header(10, 10), max_file_bytes(default) + 1)  # a small header, a huge file
    assert f"{max_file_bytes(default) + 1} bytes" in exc.value.detail
    with pytest.raises(DecodeError, match=TOO_LARGE) as exc:
        check_limits(png_header(10_000, 10_000), 1000)  # 1e8 pixels > 89.5e6: Pillow's limit
    assert "10000 x 10000 pixels" in exc.value.detail
    for small in (good_image(1), good_image(2)):  # a PNG and a JPEG, each under 70 x 70 pixels
        check_limits(small[:HEAD_BYTES], len(small))  # a usual image passes
        with pytest.raises(DecodeError, match=TOO_LARGE):
            check_limits(small[:HEAD_BYTES], len(small), max_pixels=100)  # a limit as a parameter
    check_limits(png_header(9000, 9000), 1000)  # 81e6 pixels: within the limit
    check_limits(b"not an image", 12)  # the header says nothing: the full decode will


def _worker(inp: Path, out: Path, ckpt: Path) -> ShardWorker:
    cfg = RunConfig(input=str(inp), output=str(out), model=TINY_MODEL, methods=["gae"], checkpoint=str(ckpt),
                    model_args=dict(TINY_ARGS), batch_size=4, shard_size=16)  # fmt: skip
    Plan.create(Output(str(out)), open_source(str(inp)), 16)
    return ShardWorker(cfg.to_dict(), "test-run")


def test_a_100_gb_sparse_png_is_an_error_row_and_only_its_header_is_read(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(3):
        (inp / f"good{k}.png").write_bytes(good_image(2 * k + 1))
    sparse_png(inp / "huge.png", 100_000, 100_000, 100 * GB)  # its header: 1e10 pixels
    sparse_png(inp / "long.png", 10, 10, 100 * GB)  # a 10 x 10 header, then 100 GB
    sparse_png(inp / "wide.png", 100_000, 100_000, 2**20)  # 1 MB: its header alone refuses it
    worker = _worker(inp, tmp_path / "out", ckpt)
    before = _rchar()
    res = worker.process(0)
    read = _rchar() - before
    assert (res.images, res.ok, res.errors) == (6, 3, 3)
    assert read < 20 * 2**20, f"{read} bytes read"  # headers, the plan, the good images; not 200 GB
    rows = {r["image_id"]: r for r in pq.read_table(Output(str(tmp_path / "out")).part(0)).to_pylist()}
    assert rows["huge.png"]["error"] == rows["long.png"]["error"] == rows["wide.png"]["error"] == TOO_LARGE
    assert "100000 x 100000 pixels" in rows["wide.png"]["error_detail"]
    assert "100000 x 100000 pixels" in rows["huge.png"]["error_detail"]
    assert f"{100 * GB} bytes" in rows["long.png"]["error_detail"]
    assert [rows[f"good{k}.png"]["status"] for k in range(3)] == ["ok"] * 3


def test_read_image_on_s3_refuses_from_the_header_and_reads_the_rest_whole(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    opts = storage.StorageOptions(s3_endpoint=s3_server.endpoint, region="us-east-1")
    client = s3_server.client()
    client.create_bucket(Bucket="limits")
    big = os.urandom(3 * HEAD_BYTES + 17)  # longer than the head: read in two pieces
    good = good_image(1) + big  # trailing bytes after IEND: Pillow ignores them
    client.put_object(Bucket="limits", Key="good.png", Body=good)
    client.put_object(Bucket="limits", Key="huge.png", Body=png_header(100_000, 100_000) + b"\x00" * 1000)
    assert read_image("s3://limits/good.png", opts) == good
    with pytest.raises(DecodeError, match=TOO_LARGE):
        read_image("s3://limits/huge.png", opts)
    with pytest.raises(FileNotFoundError):
        read_image("s3://limits/missing.png", opts)


_OUT_OF_MEMORY = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from tests.test_input_limits import _worker
from concurrent.futures import ThreadPoolExecutor
worker = _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
# one decoding thread: the big image's failed allocation cannot starve a small one decoding beside it
worker.decoders = ThreadPoolExecutor(1)
list(worker.decoders.map(lambda _: bytearray(2**20), range(8)))  # the thread exists
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
# Address space for what the small images need, not for the 324 MB a 9000 x 9000 image needs
resource.setrlimit(resource.RLIMIT_AS, (vm + 160 * 2**20, resource.RLIM_INFINITY))
res = worker.process(0)
print(json.dumps({"images": res.images, "ok": res.ok, "errors": res.errors}))
"""


@pytest.mark.integration
def test_an_image_whose_decoding_runs_out_of_memory_is_its_error_row(tmp_path):
    """A real allocation failure: the actor's address space is capped (RLIMIT_AS) below what one
    valid 9000 x 9000 PNG (81 Mpx, within Pillow's limit) needs to decode; the small images fit."""
    ckpt = tiny_checkpoint(tmp_path)
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "big.png").write_bytes(flat_png(9000, 9000))
    for k in range(3):
        (inp / f"good{k}.png").write_bytes(good_image(2 * k + 1))
    r = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, str(inp), str(tmp_path / "out"), str(ckpt),
                        str(ROOT)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "MALLOC_ARENA_MAX": "2"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (res["images"], res["ok"], res["errors"]) == (4, 3, 1)
    rows = {r["image_id"]: r for r in pq.read_table(Output(str(tmp_path / "out")).part(0)).to_pylist()}
    assert rows["big.png"]["status"] == "error" and rows["big.png"]["error"] == "out of memory"
    assert [rows[f"good{k}.png"]["status"] for k in range(3)] == ["ok"] * 3
    # without the cap the same image decodes: the limit, not the file, made it fail
    img = Image.open(inp / "big.png")
    assert img.size == (9000, 9000)
