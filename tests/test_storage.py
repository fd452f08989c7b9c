"""Storage: URI resolution, atomic writes, retries of transient errors, listing order."""

from __future__ import annotations

import pytest

from lnstd import storage


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, "reading x", delay=0.001) == "ok"
    assert len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "reading x", delay=0.001)
    assert len(calls) == 1

    def down():
        raise TimeoutError("timed out")

    with pytest.raises(storage.StorageError, match="reading y: timed out"):
        storage.retry(down, "reading y", attempts=2, delay=0.001)


def test_local_write_is_atomic_and_listing_is_sorted(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temporary left behind
    # a writer killed mid-write leaves a hidden temporary, which readers skip and cleanup removes
    (tmp_path / "a" / ".b.bin.tmp-dead").write_bytes(b"partial")
    assert storage.remove_temporaries(str(tmp_path / "a")) == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]
    for name in ("z/1.png", "a/2.JPG", "a/1.jpg", "m.txt"):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(b"x")
    got = list(storage.list_files(str(tmp_path / "imgs"), (".jpg", ".png")))
    assert [p.split("imgs/")[1] for p in got] == ["a/1.jpg", "a/2.JPG", "z/1.png"]
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


@pytest.mark.integration
def test_s3_roundtrip_and_missing_bucket(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    opts = storage.StorageOptions(s3_endpoint=s3_server.endpoint, region="us-east-1")
    s3_server.client().create_bucket(Bucket="roundtrip")
    storage.write_bytes("s3://roundtrip/x/y.bin", b"data", opts)
    assert storage.read_bytes("s3://roundtrip/x/y.bin", opts) == b"data"
    assert storage.exists("s3://roundtrip/x/y.bin", opts) and not storage.exists(
        "s3://roundtrip/x/z.bin", opts
    )
    assert storage.list_names("s3://roundtrip/x", opts) == ["y.bin"]
    with pytest.raises(storage.StorageError, match="bucket 'nope' does not exist"):
        list(storage.list_files("s3://nope/in", (".jpg",), opts))


def test_parquet_readers_skip_a_killed_writers_temporary(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "heatmaps"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), folder / "part-00000.parquet")
    # exactly what write_bytes would leave if killed between writing and renaming
    pq.write_table(pa.table({"x": [3]}), folder / ".part-00001.parquet.tmp-0123")
    assert pq.read_table(folder)["x"].to_pylist() == [1, 2]


@pytest.mark.integration
def test_a_create_only_write_creates_once_and_never_replaces(tmp_path, s3_server, monkeypatch):
    """A part is published only if its name is free (local: a hard link; S3: the staged copy is
    made only if nothing has the name), and no temporary or staged object is left."""
    from lnstd.output import Output

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    opts = storage.StorageOptions(s3_endpoint=s3_server.endpoint, region="us-east-1")
    s3_server.client().create_bucket(Bucket="once")
    for base in (str(tmp_path / "d"), "s3://once/d"):
        out = Output(base, opts)
        uri = out.path("part-00000.parquet")
        assert out.write(uri, b"first", create_only=True) is True
        assert out.write(uri, b"second", create_only=True) is False
        assert storage.read_bytes(uri, opts) == b"first"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["part-00000.parquet"]  # no temporary left
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="once")["Contents"]]
    assert keys == ["d/part-00000.parquet"]  # nothing left in staging
