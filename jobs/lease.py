"""The output lease: one run at a time writes an output.

A run claims ``_lnstd/lease.json`` before it writes anything else and renews its heartbeat while it
works. Local folders: the file is created with ``O_CREAT | O_EXCL`` (exactly one creator wins); S3: a
conditional create, ``PutObject`` with ``If-None-Match: *``, and renewals with ``If-Match`` on the
lease's ETag, so a run that lost its lease finds out at its next renewal and stops. A lease whose
heartbeat is older than its time-to-live (a crashed or killed run; on the same host also one whose
process is gone) may be taken over, atomically (local: rename of the stale file, one winner;
S3: ``If-Match`` on the stale ETag). ``--overwrite`` never breaks a live lease.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from lnstd import output as layout
from lnstd import storage
from lnstd.errors import OutputLockedError

__all__ = ["Holder", "Lease"]


@dataclass
class Holder:
    """Who holds (or held) a lease."""

    token: str
    host: str
    pid: int
    since: float
    heartbeat: float
    ttl: float
    run_id: str = ""

    def alive(self, now: float | None = None) -> bool:
        """Heartbeat within its time-to-live, and (on this host) the process still exists."""
        now = time.time() if now is None else now
        if now - self.heartbeat > self.ttl:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # exists, owned by someone else
        return True

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        beat = max(0.0, time.time() - self.heartbeat)
        return f"pid {self.pid} on {self.host} since {since} (last heartbeat {beat:.0f} s ago)"


class Lease:
    """Claim, renew and release the lease of one output.

    Args:
        output: the run's output (local folder or s3:// prefix).
        opts: storage options.
        ttl: seconds without a heartbeat after which the lease counts as abandoned.
        run_id: recorded in the lease for whoever reads it.
    """

    def __init__(
        self, output: str, opts: storage.StorageOptions, ttl: float = 60.0, run_id: str = ""
    ) -> None:
        self.uri = layout.uri(output, layout.LEASE)
        self.output = output
        self.opts = opts
        self.ttl = ttl
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), 0.0, 0.0, ttl, run_id)
        self.lost = threading.Event()
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3 = storage.is_s3(output)

    # --- reading ---------------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, str | None]:
        """The recorded holder and the object's ETag (S3), or (None, None) when there is none."""
        if self._s3:
            client, bucket, key = self._client()
            try:
                r = client.get_object(Bucket=bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None, None
            return _parse(r["Body"].read()), r["ETag"]
        path = storage.resolve(self.uri, self.opts)[1]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        holder = _parse(data)
        if holder is None:  # being written this instant, or torn: judge it by its age
            age = time.time() - os.path.getmtime(path) if os.path.exists(path) else 0.0
            holder = Holder("?", "?", -1, time.time() - age, time.time() - age, self.ttl)
        return holder, None

    def holder(self) -> Holder | None:
        """The live holder of the output, if any (reads only; writes nothing)."""
        h, _ = self._read()
        return h if h is not None and h.alive() else None

    def check(self) -> None:
        """Raise if another run holds the output now."""
        h = self.holder()
        if h is not None and h.token != self.me.token:
            raise OutputLockedError(_held(self.output, h))

    # --- claiming --------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Claim the output or raise :class:`OutputLockedError` naming the holder."""
        now = time.time()
        self.me.since = self.me.heartbeat = now
        for _ in range(5):
            if self._create():
                self._start()
                return
            h, etag = self._read()
            if h is None:
                continue  # released between our attempt and the read: try again
            if h.alive():
                raise OutputLockedError(_held(self.output, h))
            if self._take_over(etag):
                self._start()
                return
        raise OutputLockedError(
            f"{self.output}: could not claim the output's lease (others keep claiming it)"
        )

    def _body(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _put(self, **condition: str | None) -> bool:
        """Write our lease to S3 if ``condition`` (If-None-Match / If-Match) holds; False if not."""
        client, bucket, key = self._client()
        try:
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), **condition)["ETag"]
            return True
        except client.exceptions.ClientError as exc:
            if _precondition(exc) or _missing(exc):
                return False
            raise

    def _create(self) -> bool:
        if self._s3:
            return self._put(IfNoneMatch="*")
        path = storage.resolve(self.uri, self.opts)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._body())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, etag: str | None) -> bool:
        """Replace an abandoned lease; exactly one of several racing runs succeeds."""
        if self._s3:
            return self._put(IfMatch=etag)
        path = storage.resolve(self.uri, self.opts)[1]
        try:
            os.rename(path, f"{path}.stale-{self.me.token}")  # one racer renames it, the others fail
        except FileNotFoundError:
            return False
        os.remove(f"{path}.stale-{self.me.token}")
        return self._create()

    # --- keeping it ------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lnstd-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 4)):
            try:
                if not self.renew():
                    self.lost.set()
                    return
            except Exception:  # a storage hiccup: try again at the next beat, the ttl has room
                continue

    def renew(self) -> bool:
        """Refresh the heartbeat; False if the lease is no longer ours."""
        self.me.heartbeat = time.time()
        if self._s3:
            return self._put(IfMatch=self._etag)
        h, _ = self._read()
        if h is None or h.token != self.me.token:
            return False
        storage.write_bytes(self.uri, self._body(), self.opts)
        return True

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        h, etag = self._read()
        if h is None or h.token != self.me.token:
            return
        if self._s3:
            client, bucket, key = self._client()
            with contextlib.suppress(client.exceptions.ClientError):
                client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(storage.resolve(self.uri, self.opts)[1])

    def _client(self) -> tuple[Any, str, str]:
        bucket, _, key = self.uri[len("s3://") :].partition("/")
        return storage.s3_client(self.opts), bucket, key


def _parse(data: bytes) -> Holder | None:
    try:
        d = json.loads(data)
        return Holder(**{k: d[k] for k in Holder.__dataclass_fields__ if k in d})
    except (ValueError, TypeError, KeyError):
        return None


def _held(output: str, h: Holder) -> str:
    return (
        f"{output} is being written by another run ({h.describe()}); wait for it to finish, or if it "
        f"was killed, rerun once its lease expires ({h.ttl:.0f} s after its last heartbeat)"
    )


def _precondition(exc: Exception) -> bool:
    resp = getattr(exc, "response", {}) or {}
    return resp.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _missing(exc: Exception) -> bool:
    resp = getattr(exc, "response", {}) or {}
    return resp.get("Error", {}).get("Code") in ("NoSuchKey", "404")
