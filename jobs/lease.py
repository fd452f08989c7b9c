"""The output lease: one run at a time writes an output, and its commits can prove it.

A run claims ``_lnstd/lease.json`` before it writes anything else and renews its heartbeat while it
works. The lease carries the holder's random token and a **generation** (a fencing token): 1 for the
first lease of an output, one more at every claim after it. The lease object is never deleted: a
release leaves a tombstone (``released``) that keeps the generation, so generations only grow.
A lease whose heartbeat is older than its time-to-live (a crashed or killed run), or a tombstone,
may be claimed by the next run. On the holder's own host its process decides first (:meth:`Holder.alive`):
gone, the lease is free at once; running, it is held whatever the reader's clock says.
``--overwrite`` never breaks a live lease.

What each store guarantees:

- **Local folder.** Every change of the lease (claim, takeover, renewal, release) and every check
  (:meth:`Lease.verify`, :meth:`Lease.fenced`) happens under an exclusive ``flock`` of
  ``_lnstd/lease.lock`` (a file that is never deleted, so every process locks the same inode): read,
  decide, write atomically (temporary file, then rename), unlock. So claims are serialised and
  exactly one of any number of racers wins; a renewal cannot overwrite a lease another run has taken;
  and a commit made inside :meth:`Lease.fenced` cannot interleave with a takeover: it happens entirely
  before it (the taker then owns what was committed) or not at all (the committer finds the lease
  gone and raises :class:`LeaseLostError`). This holds on one host, and on a network file system
  only where ``flock`` is coherent across clients (NFSv4 with lock support; not every FUSE mount).
- **S3.** A claim is a conditional write: ``If-None-Match: *`` to create the lease, ``If-Match`` on the
  ETag that was read to take over an abandoned one; a renewal is ``If-Match`` on this run's last
  ETag. S3 applies a conditional write atomically, so one racer wins. A reply that is lost after S3
  committed the write (a dropped connection, a 500/503, then a retry that meets 412) is told apart
  from a stranger's write by reading the lease back: the body carries this run's token and
  generation. S3 has no condition that spans two objects, so :meth:`Lease.fenced` verifies the
  lease (a ``HEAD`` with ``If-Match`` on this run's ETag, and a heartbeat younger than the
  time-to-live) just before the commit; a commit can still land after a takeover that happens in
  the moment between that check and the write. The time-to-live bounds that window: a run that
  cannot renew stops committing before its lease can be declared abandoned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from lnstd import storage
from lnstd.errors import LeaseLostError, OutputError, OutputLockedError
from lnstd.output import LEASE, LEASE_LOCK, Output, not_a_file

from .holder import Holder, parse, process_id

__all__ = ["Holder", "Lease", "LeaseLostError"]

UNREADABLE = "?"  # the token of a lease record that does not parse (torn, or written by hand)


class Lease:
    """Claim, renew, verify and release the lease of one output.

    Args:
        out: the run's output (local folder or s3:// prefix).
        ttl: seconds without a heartbeat after which the lease counts as abandoned.
        run_id: recorded in the lease for whoever reads it.
    """

    def __init__(self, out: Output, ttl: float = 60.0, run_id: str = "") -> None:
        self.out = out
        self.uri = out.path(LEASE)
        self.output = out.uri
        self.opts = out.opts
        self.ttl = ttl
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), 0.0, 0.0, ttl, run_id,
                         process=process_id(os.getpid()))  # fmt: skip
        self.lost = threading.Event()
        self._etag: str | None = None
        self._written = 0.0  # when our last write of the lease was acknowledged (S3)
        self._mu = threading.Lock()  # one lease operation at a time in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3 = out.s3
        self._s3_client: Any = None

    @classmethod
    def follow(cls, out: Output, token: str, generation: int, ttl: float = 60.0) -> Lease:
        """A view of a lease another process holds (e.g. an actor's view of its driver's lease):
        it never claims or renews, it only :meth:`verify` s and :meth:`fenced` s commits."""
        lease = cls(out, ttl=ttl)
        lease.me.token, lease.me.generation = token, generation
        return lease

    @property
    def generation(self) -> int:
        """This run's fencing token: larger than that of every earlier holder of the output."""
        return self.me.generation

    @property
    def token(self) -> str:
        """This run's random token (with :attr:`generation`, what :meth:`follow` needs)."""
        return self.me.token

    # --- reading ---------------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, str | None]:
        """The recorded holder and the object's ETag (S3), or (None, None) when there is none."""
        if self._s3:
            client, bucket, key = self._client()
            try:
                r = client.get_object(Bucket=bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None, None
            return parse(r["Body"].read()), r["ETag"]
        path = self._path()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            raise OutputError(not_a_file(self.uri)) from None
        holder = parse(data)
        if holder is None:  # written by hand or by an old version, torn: judge it by its age
            age = time.time() - os.path.getmtime(path) if os.path.exists(path) else 0.0
            holder = Holder(UNREADABLE, "?", -1, time.time() - age, time.time() - age, self.ttl)
        return holder, None

    def holder(self) -> Holder | None:
        """The live holder of the output, if any (reads only; writes nothing)."""
        h, _ = self._read()
        return h if h is not None and h.alive() else None

    def _mine(self, h: Holder | None) -> bool:
        """``h`` was written by this run (a released lease included)."""
        return h is not None and h.token == self.me.token and h.generation == self.me.generation

    def _holds(self, h: Holder | None) -> bool:
        """``h`` says this run holds the lease."""
        return self._mine(h) and h is not None and not h.released

    def name_run(self, run_id: str) -> None:
        """Record the run's id in the lease (from its next heartbeat on), for whoever reads it."""
        with self._mu:
            self.me.run_id = run_id

    # --- claiming --------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Claim the output or raise :class:`OutputLockedError` naming the holder."""
        now = time.time()
        self.me.since = self.me.heartbeat = now
        self.me.released = False
        with self._mu:
            claimed = self._claim_local() if not self._s3 else self._claim_s3()
        if claimed:
            self._start()
            return
        raise OutputLockedError(
            f"{self.output}: could not claim the output's lease (others keep claiming it)"
        )

    def _claim_local(self) -> bool:
        with self._locked():
            h, _ = self._read()
            if h is not None and h.alive() and h.token != self.me.token:
                raise OutputLockedError(_held(self.output, h))
            self.me.generation = (h.generation if h is not None else 0) + 1
            self._write_local()
        return True

    def _claim_s3(self) -> bool:
        for _ in range(5):
            self.me.generation = 1
            if self._put(IfNoneMatch="*"):
                return True
            h, etag = self._read()
            if h is None:
                continue  # removed between our attempt and the read: try again
            if h.alive():
                raise OutputLockedError(_held(self.output, h))
            self.me.generation = h.generation + 1
            if self._put(IfMatch=etag):  # exactly one of several racing runs succeeds
                return True
        return False

    def _body(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _put(self, **condition: str | None) -> bool:
        """Write our lease to S3 if ``condition`` (If-None-Match / If-Match) holds; False if not.

        When the answer is lost (a dropped connection, a 5xx, or a retry of a write S3 already
        applied, which then fails its own condition), the lease is read back: if it carries our
        token and generation, the write was ours.
        """
        import botocore.exceptions

        client, bucket, key = self._client()
        try:
            r = client.put_object(Bucket=bucket, Key=key, Body=self._body(), **condition)
            self._etag, self._written = r["ETag"], time.time()
            return True
        except client.exceptions.ClientError as exc:
            refused = storage.precondition_failed(exc) or _missing(exc)
            if not refused and not _server_error(exc):
                raise
            error: Exception = exc
        except botocore.exceptions.BotoCoreError as exc:  # connection dropped, timed out
            refused, error = False, exc
        h, etag = self._read()
        if self._mine(h) and h is not None:  # ours: this write's or an earlier one whose reply was lost
            self._etag, self._written = etag, h.heartbeat
            return True
        if refused:
            return False
        raise error

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
        """Refresh the heartbeat if the lease is still ours (a conditional write); False if not."""
        with self._mu:
            if self.me.released:
                return False
            self.me.heartbeat = time.time()
            if self._s3:
                return self._put(IfMatch=self._etag)
            with self._locked():
                if not self._holds(self._read()[0]):
                    return False
                self._write_local()
                return True

    def verify(self) -> bool:
        """Whether this run holds the lease now (local: read under the lock; S3: a HEAD with
        If-Match on our last ETag, read back when that ETag is unknown or has changed)."""
        if not self._s3:
            with self._locked():
                return self._holds(self._read()[0])
        with self._mu:
            return self._verify_s3()

    def _verify_s3(self) -> bool:
        if self.me.released:
            return False
        if self._etag is not None and time.time() - self._written < self.ttl:
            client, bucket, key = self._client()
            try:
                client.head_object(Bucket=bucket, Key=key, IfMatch=self._etag)
                return True
            except client.exceptions.ClientError as exc:
                if not (storage.precondition_failed(exc) or _missing(exc)):
                    raise
        h, etag = self._read()  # a follower, or our ETag changed: compare the body
        if not self._holds(h) or h is None or time.time() - h.heartbeat > self.ttl:
            return False
        self._etag, self._written = etag, h.heartbeat
        return True

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """Run the body (a commit) only while this run holds the lease, else raise
        :class:`LeaseLostError`. Local: the lease's lock is held throughout, so no takeover can
        interleave (keep the body short: the rename that publishes, not the work; and call no other
        method of a lease of this output in it: they wait for the same lock). S3: verified just
        before (see the module's notes for what that leaves open)."""
        if not self._s3:
            with self._locked():
                if not self._holds(self._read()[0]):
                    raise LeaseLostError(_lost(self.output))
                yield
            return
        if not self.verify():
            raise LeaseLostError(_lost(self.output))
        yield

    def release(self) -> None:
        """Stop renewing and mark the lease released if it is still ours (the generation stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._mu:
            self.me.released = True
            if self._s3:
                with contextlib.suppress(Exception):
                    self._put(IfMatch=self._etag)
                return
            with self._locked():
                if self._holds(self._read()[0]):
                    self._write_local()

    # --- the stores ------------------------------------------------------------------------------
    def _path(self) -> str:
        return storage.resolve(self.uri, self.opts)[1]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lease's exclusive lock (local outputs): ``flock`` on ``_lnstd/lease.lock``."""
        path = self.out.local_path(LEASE_LOCK)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            raise OutputError(not_a_file(self.out.path(LEASE_LOCK))) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor of the open file releases the lock

    def _write_local(self) -> None:
        storage.write_bytes(self.uri, self._body(), self.opts)

    def _client(self) -> tuple[Any, str, str]:
        bucket, _, key = self.uri[len("s3://") :].partition("/")
        if self._s3_client is None:
            self._s3_client = storage.s3_client(self.opts)
        return self._s3_client, bucket, key


def _held(output: str, h: Holder) -> str:
    if h.token == UNREADABLE:  # judged by its age (Lease._read), said as what it is
        return (
            f"{output}: its lease record {LEASE} does not read as one (written "
            f"{time.time() - h.heartbeat:.0f} s ago); if no run is writing this output, rerun once it "
            f"is {h.ttl:.0f} s old, or delete it"
        )
    return (
        f"{output} is being written by another run ({h.describe()}); wait for it to finish, or if it "
        f"was killed, rerun once its lease expires ({h.ttl:.0f} s after its last heartbeat)"
    )


def _lost(output: str) -> str:
    return f"{output}: this run lost the output's lease to another run; stopped"


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", {}) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("NoSuchKey", "404")


def _server_error(exc: Exception) -> bool:
    status = (getattr(exc, "response", {}) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return int(status or 0) >= 500 or _code(exc) in ("InternalError", "ServiceUnavailable", "SlowDown")
