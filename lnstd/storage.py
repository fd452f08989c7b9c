"""One place that turns a URI into storage: local paths, ``file://`` and ``s3://`` (any endpoint).

Credentials come only from the standard AWS variables / profiles / roles and are never logged,
written to manifests or put in Parquet metadata; the endpoint comes from ``--s3-endpoint`` or
``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.fs as pafs

from .endpoint import check_endpoint, checked_client
from .errors import LnstdError

__all__ = [
    "NotRegularFileError",
    "StorageError",
    "StorageOptions",
    "check_credentials",
    "delete_file",
    "delete_tree",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "list_names",
    "local_uri",
    "precondition_failed",
    "publish_local",
    "read_bytes",
    "remove_temporaries",
    "resolve",
    "retry",
    "s3_client",
    "s3_copy",
    "s3_delete_if",
    "s3_etag",
    "s3_objects",
    "s3_put_once",
    "stage_local",
    "walk_local",
    "write_bytes",
]

T = TypeVar("T")


class StorageError(LnstdError, OSError):
    """A storage problem a user can act on (missing credential, missing bucket, ...)."""


class NotRegularFileError(StorageError):
    """A local input that is not a regular file (a FIFO, socket or device): never opened."""

    reason = "not a regular file"


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives; no secrets here (they stay in the environment)."""

    s3_endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, s3_endpoint: str | None = None) -> StorageOptions:
        return cls(
            s3_endpoint=s3_endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI path components with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def check_credentials() -> None:
    """Fail early, naming the missing variable, when no AWS credentials can be found."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and not secret:
        raise StorageError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    if secret and not key:
        raise StorageError("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not")
    if key and secret:
        return
    import boto3
    import botocore.exceptions

    try:
        found = boto3.Session().get_credentials()
    except botocore.exceptions.ProfileNotFound as exc:
        raise StorageError(f"AWS_PROFILE names a profile that does not exist: {exc}") from None
    if found is None:
        raise StorageError(
            "no AWS credentials for s3://: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or run where an instance/pod role provides them)"
        )


_FS_CACHE: dict[StorageOptions, pafs.FileSystem] = {}


def _s3(opts: StorageOptions) -> pafs.FileSystem:
    if opts not in _FS_CACHE:
        check_credentials()
        kwargs: dict = {
            "region": opts.region or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=6),
        }
        if opts.s3_endpoint:
            scheme, _, host = check_endpoint(opts.s3_endpoint).rpartition("://")
            kwargs.update(endpoint_override=host or opts.s3_endpoint, scheme=scheme or "https")
        _FS_CACHE[opts] = pafs.S3FileSystem(**kwargs)
    return _FS_CACHE[opts]


def s3_client(opts: StorageOptions | None = None):  # -> botocore client
    """A boto3 S3 client for the configured endpoint (which must answer) and region (credentials: env)."""
    import boto3

    opts = opts or StorageOptions.from_env()
    check_credentials()
    client = boto3.client("s3", endpoint_url=opts.s3_endpoint, region_name=opts.region or "us-east-1")
    return checked_client(client)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


_ONCE: dict[tuple[StorageOptions, float], object] = {}


def _client_once(opts: StorageOptions, timeout: float):  # -> botocore client
    """A client that makes one attempt per request, within ``timeout`` seconds (no retry of its own
    that could land after the caller gave up)."""
    if (opts, timeout) not in _ONCE:
        import boto3
        from botocore.config import Config

        check_credentials()
        config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=timeout,
                        read_timeout=timeout)  # fmt: skip
        _ONCE[(opts, timeout)] = boto3.client(
            "s3", endpoint_url=opts.s3_endpoint, region_name=opts.region or "us-east-1", config=config
        )
    return _ONCE[(opts, timeout)]


def s3_put_once(uri: str, data: bytes, opts: StorageOptions, timeout: float) -> str:
    """Upload ``data`` to ``uri`` in a single attempt; returns the object's ETag.

    Raises:
        StorageError: the attempt failed or timed out (it may still land later: give each attempt
            its own key).
    """
    bucket, key = _bucket_key(uri)
    try:
        return str(_client_once(opts, timeout).put_object(Bucket=bucket, Key=key, Body=data)["ETag"])
    except Exception as exc:  # botocore's client and connection errors alike
        raise StorageError(f"writing {uri}: {type(exc).__name__}: {exc}") from None


def s3_copy(src: str, dst: str, etag: str, opts: StorageOptions, timeout: float, create_only: bool) -> bool:
    """Server-side copy of ``src`` (only while it still has ``etag``) to ``dst``; with
    ``create_only``, not over an existing ``dst`` (False then). One attempt within ``timeout``.

    Raises:
        StorageError: the copy failed, timed out, or ``src`` is gone or changed.
    """
    client = _client_once(opts, timeout)
    bucket, key = _bucket_key(dst)
    try:
        if create_only:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return False
            except client.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        src_bucket, src_key = _bucket_key(src)
        client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key},
                           CopySourceIfMatch=etag)  # fmt: skip
        return True
    except Exception as exc:
        raise StorageError(f"publishing {dst}: {type(exc).__name__}: {exc}") from None


def s3_delete_if(uri: str, etag: str, opts: StorageOptions, timeout: float) -> bool:
    """Delete ``uri`` only while it still has ``etag`` (a conditional delete); False if it changed
    or is gone."""
    client = _client_once(opts, timeout)
    bucket, key = _bucket_key(uri)
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        return True
    except client.exceptions.ClientError as exc:
        if precondition_failed(exc) or str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            return False
        raise StorageError(f"deleting {uri}: {exc}") from None


def s3_objects(uri: str, opts: StorageOptions) -> Iterator[tuple[str, str]]:
    """(uri, ETag) of every object under the prefix ``uri`` (recursively), page by page."""
    bucket, key = _bucket_key(uri.rstrip("/") + "/")
    pages = s3_client(opts).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    for page in pages:
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}", str(obj["ETag"])


def s3_etag(uri: str, opts: StorageOptions) -> str | None:
    """The object's ETag (None if there is none)."""
    client = s3_client(opts)
    bucket, key = _bucket_key(uri)
    try:
        return str(client.head_object(Bucket=bucket, Key=key)["ETag"])
    except client.exceptions.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def local_uri(path: str) -> str:
    """A local path as text that UTF-8 can carry (Arrow and Parquet strings must be UTF-8).

    A path whose bytes are UTF-8 is returned unchanged. Any other byte sequence a file system
    allows (Python holds it with ``surrogateescape``, e.g. ``bad\\udcffname.png`` for the byte
    0xFF) becomes a ``file://`` URI with the path's bytes percent-escaped (RFC 8089), which
    :func:`resolve` turns back into the same bytes. A plain path never starts with ``file://``,
    so the two forms cannot be confused.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def resolve(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it)."""
    opts = opts or StorageOptions.from_env()
    if is_s3(uri):
        return _s3(opts), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):  # RFC 8089: percent-escaped bytes (see local_uri)
        uri = os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://") :]))
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def retry(fn: Callable[[], T], what: str, attempts: int = 4, delay: float = 0.5) -> T:
    """Run ``fn``, retrying transient I/O errors with exponential backoff.

    Missing files and permission problems are not transient and are raised at once.
    """
    for k in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, StorageError):
            raise
        except OSError as exc:
            if k == attempts - 1:
                raise StorageError(f"{what}: {exc}") from exc
            time.sleep(delay * 2**k)
    raise AssertionError("unreachable")


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    """The whole object/file at ``uri``."""
    fs, path = resolve(uri, opts)

    def read() -> bytes:
        if isinstance(fs, pafs.LocalFileSystem):  # Python's open: any bytes in the name
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block: never open it
                raise NotRegularFileError(f"{uri}: {NotRegularFileError.reason}")
            with open(path, "rb") as f:
                return f.read()
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry(read, f"reading {uri}")


def stage_local(path: str, data: bytes) -> str:
    """``data`` written and synced to a temporary beside ``path``; returns its name. A dot-name:
    Parquet dataset readers skip it, so a writer killed mid-write leaves nothing that a reader of
    the folder would take for data (remove_temporaries clears it later)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def precondition_failed(exc: Exception) -> bool:
    """An S3 conditional write (If-Match / If-None-Match) was refused: the condition did not hold."""
    code = str(((getattr(exc, "response", {}) or {}).get("Error", {}) or {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def publish_local(path: str, tmp: str, create_only: bool = False) -> bool:
    """Give the temporary ``tmp`` (from :func:`stage_local`) the name ``path``: an atomic rename, or
    with ``create_only`` a hard link, which fails if the name exists (False then: what is there stays).
    The temporary is gone afterwards either way."""
    try:
        if not create_only:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes, opts: StorageOptions | None = None) -> None:
    """Write ``data`` so that ``uri`` appears complete or not at all.

    Local: a temporary name in the same folder, then an atomic rename. S3: one upload of the
    whole buffer (an object becomes visible only when its upload completes).
    """
    fs, path = resolve(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        publish_local(path, stage_local(path, data))
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(put, f"writing {uri}")


def remove_temporaries(uri: str, opts: StorageOptions | None = None) -> int:
    """Delete the temporary files that killed writers left in a local folder; returns how many.

    Only call this while no writer is active in that folder. S3 needs nothing: it has no partial
    objects.
    """
    fs, path = resolve(uri, opts)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(path):
        return 0
    stale = [n for n in os.listdir(path) if n.startswith(".") and ".tmp-" in n]
    for n in stale:
        os.remove(os.path.join(path, n))
    return len(stale)


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, opts)
    info = retry(lambda: fs.get_file_info(path), f"checking {uri}")
    return info.type != pafs.FileType.NotFound


def list_names(uri: str, opts: StorageOptions | None = None) -> list[str]:
    """Base names directly under a folder/prefix (empty if it does not exist)."""
    fs, path = resolve(uri, opts)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = retry(lambda: fs.get_file_info(sel), f"listing {uri}")
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def delete_file(uri: str, opts: StorageOptions | None = None) -> None:
    """Remove one file/object, if present."""
    fs, path = resolve(uri, opts)
    if fs.get_file_info(path).type == pafs.FileType.File:
        retry(lambda: fs.delete_file(path), f"deleting {uri}")


def delete_tree(uri: str, opts: StorageOptions | None = None) -> None:
    """Remove a folder/prefix and everything under it, if present."""
    fs, path = resolve(uri, opts)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        retry(lambda: fs.delete_dir(path), f"deleting {uri}")


def list_files(uri: str, extensions: tuple[str, ...], opts: StorageOptions | None = None) -> Iterator[str]:
    """Stream the URIs of files under a folder/prefix, recursively, in a deterministic order.

    S3 keys come in lexicographic order, page by page, so a listing of millions of keys never
    sits in memory at once; local folders are walked with sorted entries. Hidden names (a path part
    starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped.
    """
    opts = opts or StorageOptions.from_env()
    exts = tuple(e.lower() for e in extensions)
    if is_s3(uri):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = s3_client(opts)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    hidden = any(p.startswith(".") for p in key[len(prefix) :].split("/"))
                    if key.lower().endswith(exts) and not hidden:
                        yield f"s3://{bucket}/{key}"
        except client.exceptions.NoSuchBucket:
            raise StorageError(f"bucket {bucket!r} does not exist") from None
        return
    for path, _ in walk_local(resolve(uri, opts)[1], exts):
        yield path


def walk_local(
    root: str, extensions: tuple[str, ...], unreadable: list[str] | None = None
) -> Iterator[tuple[str, bool]]:
    """``(path, is a regular file)`` of each file under a local folder whose name ends in one of
    ``extensions`` (lower case), recursively: a folder's files in sorted order, then its subfolders
    in sorted order. Hidden names (``.git``, ``._x.jpg``) are skipped, and so are links to folders.
    A subfolder that cannot be listed is skipped and, if ``unreadable`` is given, appended to it.
    """
    if not os.path.isdir(root):
        from .errors import InputError

        raise InputError(f"input folder not found: {root}")
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if folder == root:
                from .errors import InputError

                raise InputError(f"input folder cannot be read: {root} ({exc.strerror})") from None
            if unreadable is not None:
                unreadable.append(folder)
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not e.is_symlink():
                    subfolders.append(e.path)
            elif e.name.lower().endswith(extensions):
                # A FIFO, socket or device is not; a link (a loop too) is judged when it is read.
                try:
                    regular = e.is_file()
                except OSError:  # ELOOP: a link that leads back to itself
                    regular = False
                yield e.path, regular or e.is_symlink()
        stack.extend(reversed(subfolders))
