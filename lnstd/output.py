"""Where everything lives in a run's output (local folder or S3 prefix): the one place that knows.

Only the heatmap rows are Parquet (``heatmaps/part-NNNNN.parquet``, one file per committed shard);
everything else starts with ``_`` (dataset readers such as pyarrow, pandas and Spark skip those) and
none of it ends in ``.parquet`` (DuckDB's and Polars' globs take every ``*.parquet``). So a reader
pointed at the output folder gets the heatmap rows and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from . import storage
from .errors import OutputError, one_line
from .metrics.registry import FAITHFULNESS_CURVES, FAITHFULNESS_METRICS, MASK_METRICS

__all__ = [
    "AGGREGATE",
    "HEATMAPS",
    "LEASE",
    "LEASE_LOCK",
    "MANIFEST",
    "PLAN",
    "REPORT",
    "RUN",
    "SHARD_COUNTS",
    "STAGING",
    "STATE",
    "SUCCESS",
    "Footer",
    "Manifest",
    "Output",
    "not_a_file",
    "part_name",
    "row_fields",
    "shard_of",
]

HEATMAPS = "heatmaps"  # the dataset: part-NNNNN.parquet
SUCCESS = "_SUCCESS"  # every shard of the plan is committed
MANIFEST = "_manifest.json"  # configuration, versions, counts and timings of the last run
REPORT = "_report.html"  # the report page
AGGREGATE = "_aggregate"  # summary.csv, per_class.csv, counts.json, where_classes.csv, where/
STATE = "_lnstd"  # the run's own state: run.json, the lease, the plan, node probes
STAGING = "_lnstd/staging"  # S3: a run's writes before their fenced publication, per lease generation
RUN = "_lnstd/run.json"  # the configuration that decides the results (what a resume must match)
LEASE = "_lnstd/lease.json"  # who holds the output while a run is active
LEASE_LOCK = "_lnstd/lease.lock"  # local outputs: flock'ed around every change and check of the lease
PLAN = "_lnstd/plan"  # the shard plan: plan.json (commit point) and part-NNNNN.arrow
SHARD_COUNTS = b"lnstd.shard_counts"  # Parquet footer key: {"images", "ok", "errors"} of the shard


def row_fields(heat: pa.DataType) -> list[tuple[str, pa.DataType]]:
    """The row layout of ``heatmaps/part-*.parquet`` (docs/architecture.md lists every column);
    ``heat`` is the heatmap column's type (fixed-size when every method shares one grid)."""
    return [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crop_box", pa.list_(pa.float32(), 4)),
        ("model", pa.string()),
        ("method", pa.string()),
        ("target", pa.int64()),
        ("predicted", pa.int64()),
        ("probability", pa.float32()),
        ("heatmap", heat),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("label", pa.int64()),
        ("correct", pa.bool_()),
        *[(name, pa.float32()) for name in MASK_METRICS],
        *[(name, pa.float32()) for name in FAITHFULNESS_METRICS],
        *[(name, pa.list_(pa.float32())) for name in FAITHFULNESS_CURVES],
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("shard", pa.int32()),
        ("elapsed_ms", pa.float32()),
        ("completeness", pa.float32()),
    ]


def part_name(shard: int) -> str:
    """File name of a shard's heatmaps."""
    return f"part-{shard:05d}.parquet"


def shard_of(name: str) -> int | None:
    """The shard number of a committed part file name, or None for any other name."""
    if name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit():
        return int(name[5:-8])
    return None


@dataclass(frozen=True)
class Footer:
    """What a committed part says of itself: its shard's counts, its rows and the run that wrote it."""

    counts: dict[str, int]
    rows: int
    run_id: str


@dataclass
class Manifest:
    """``_manifest.json``: what a run did (configuration, versions, counts, timings). ``noop`` marks
    a rerun that found the output finished (it is never written)."""

    run_id: str
    counts: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    input_check: dict[str, Any] | None = None
    failed_shards: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    driver_peak_rss_mb: float = 0.0
    actor_peak_rss_mb: float = 0.0
    noop: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """From the JSON object (unknown keys ignored, so older and newer manifests both read)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "noop"})

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("noop")
        return json.dumps(d, indent=1).encode()


Guard = Callable[[], AbstractContextManager[Any]]


class Output:
    """A run's output (local folder or S3 prefix) and its storage options: where each file of the
    layout lives, and reading and writing them. The one place that knows the layout.

    Args:
        uri: the output (a local path, ``file://`` or ``s3://``).
        opts: storage options (endpoint); ``None``: from the environment.
    """

    def __init__(self, uri: str, opts: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.opts = opts if opts is not None else storage.StorageOptions.from_env()
        self._guard: Guard | None = None
        self.generation = 0
        self.deadline = 20.0  # seconds for each S3 request of a write (one attempt each)

    def fence_with(self, guard: Guard, generation: int, ttl: float) -> None:
        """From now on every write and deletion through this object happens under ``guard`` (a run's
        ``Lease.fenced``: raises ``LeaseLostError`` once the run lost the output), and S3 writes are
        staged under ``_lnstd/staging/g<generation>/`` first (see :meth:`write`)."""
        self._guard, self.generation = guard, generation
        self.deadline = max(1.0, min(20.0, ttl / 4))  # well inside the lease's time-to-live

    def _fenced(self) -> AbstractContextManager[Any]:
        return self._guard() if self._guard is not None else contextlib.nullcontext()

    # --- every write and deletion of a run -------------------------------------------------------
    def write(self, uri: str, data: bytes, create_only: bool = False) -> bool:
        """Write ``uri`` (a file of this output) complete or not at all, and only while the run holds
        the output; with ``create_only`` never over an existing file (False then).

        Local: a temporary beside it, then a rename (or hard link) under the fence, which holds the
        lease's lock, so no takeover can interleave. S3: one upload (a single attempt) to a key of its
        own under this generation's staging folder, then a server-side copy under the fence,
        conditional on the staged object's ETag. A new holder deletes every older generation's
        staging folder before it reads anything, so a copy that was checked and then delayed finds
        no source and lands nothing; an upload delayed past its attempt lands in staging only.
        """
        if not self.s3:
            path = storage.resolve(uri, self.opts)[1]
            if os.path.isdir(path):
                raise OutputError(not_a_file(uri))
            tmp = storage.stage_local(path, data)
            try:
                with self._fenced():
                    return storage.publish_local(path, tmp, create_only)
            finally:
                with contextlib.suppress(OSError):
                    os.remove(tmp)  # the fence refused: the temporary goes
        staged = self.path(STAGING, f"g{self.generation:06d}", f"{uuid.uuid4().hex}-{uri.rsplit('/', 1)[-1]}")
        etag = storage.s3_put_once(staged, data, self.opts, self.deadline)
        try:
            with self._fenced():
                return storage.s3_copy(staged, uri, etag, self.opts, self.deadline, create_only)
        finally:
            with contextlib.suppress(Exception):
                storage.s3_delete_if(staged, etag, self.opts, self.deadline)

    def delete(self, uri: str) -> None:
        """Remove one file of this output, if there, only while the run holds the output (S3: only
        the object that was there when the fence was checked: a conditional delete on its ETag)."""
        if not self.s3:
            with self._fenced():
                storage.delete_file(uri, self.opts)
            return
        etag = storage.s3_etag(uri, self.opts)
        if etag is not None:
            with self._fenced():
                storage.s3_delete_if(uri, etag, self.opts, self.deadline)

    def delete_tree(self, uri: str, keep: Callable[[str], bool] | None = None) -> None:
        """Remove a folder of this output (except what ``keep`` says of a URI), under the fence."""
        if not self.s3:
            with self._fenced():
                path = storage.resolve(uri, self.opts)[1]
                if keep is None:
                    storage.delete_tree(uri, self.opts)
                elif os.path.isdir(path):
                    for name in os.listdir(path):
                        if not keep(storage.join(uri, name)):
                            storage.delete_tree(storage.join(uri, name), self.opts)
                            storage.delete_file(storage.join(uri, name), self.opts)
            return
        batch: list[tuple[str, str]] = []
        for obj in storage.s3_objects(uri, self.opts):
            if keep is None or not keep(obj[0]):
                batch.append(obj)
            if len(batch) == 1000:
                self._delete_objects(batch)
                batch = []
        self._delete_objects(batch)

    def _delete_objects(self, objects: list[tuple[str, str]]) -> None:
        if objects:
            with self._fenced():  # one check of the lease per page of objects
                for uri, etag in objects:
                    storage.s3_delete_if(uri, etag, self.opts, self.deadline)

    def sweep_staging(self) -> None:
        """Delete what earlier generations left in the staging folder (a run does this first, so
        that no delayed publication of an earlier holder can find its source)."""
        own = self.path(STAGING, f"g{self.generation:06d}")
        self.delete_tree(self.path(STAGING), keep=lambda u: u == own or u.startswith(own + "/"))

    def __repr__(self) -> str:
        return f"Output({self.uri!r})"

    @property
    def s3(self) -> bool:
        return storage.is_s3(self.uri)

    def path(self, *names: str) -> str:
        """``names`` joined below the output (a URI of the same kind)."""
        return storage.join(self.uri, *names)

    def local_path(self, *names: str) -> str:
        """The file-system path of ``names`` (local outputs)."""
        return storage.resolve(self.path(*names), self.opts)[1]

    # --- the dataset: heatmaps/part-NNNNN.parquet ------------------------------------------------
    def part(self, shard: int) -> str:
        """Where shard ``shard``'s heatmaps are committed."""
        return self.path(HEATMAPS, part_name(shard))

    def committed(self) -> set[int]:
        """The shards that have a part file (not yet checked).

        Raises:
            OutputError: a folder (or anything but a file) has a part's name.
        """
        fs, path = storage.resolve(self.path(HEATMAPS), self.opts)
        sel = storage.pafs.FileSelector(path, allow_not_found=True, recursive=False)
        found = set()
        for info in storage.retry(lambda: fs.get_file_info(sel), f"listing {self.path(HEATMAPS)}"):
            shard = shard_of(info.base_name)
            if shard is not None and info.type != storage.pafs.FileType.File:
                raise OutputError(not_a_file(self.path(HEATMAPS, info.base_name)))
            if shard is not None:
                found.add(shard)
        return found

    def footer(self, shard: int) -> Footer | None:
        """The footer of shard ``shard``'s part, or None if the part is missing or unreadable
        (truncated, empty, not Parquet)."""
        import pyarrow.parquet as pq

        fs, path = storage.resolve(self.part(shard), self.opts)
        try:
            with fs.open_input_file(path) as f:
                meta = pq.read_metadata(f)
            kv = meta.metadata or {}
            counts = json.loads(kv.get(SHARD_COUNTS, b"{}"))
            return Footer(counts, meta.num_rows, kv.get(b"lnstd.run_id", b"").decode())
        except (OSError, ValueError):
            return None

    # --- state files -----------------------------------------------------------------------------
    def read_state(self, name: str, keys: dict[str, type] | None = None) -> dict | None:
        """The JSON state file ``name`` (None when absent).

        Raises:
            OutputError: the file is not JSON, not an object, or lacks one of ``keys`` or has it of
                another type (a torn write, a hand edit): one line naming the file and what to do.
        """
        where = self.path(name)
        try:
            data = storage.read_bytes(where, self.opts)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, storage.NotRegularFileError):
            raise OutputError(not_a_file(where)) from None
        try:
            state = json.loads(data)
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            for key, kind in (keys or {}).items():
                if not isinstance(state.get(key), kind):
                    raise ValueError(f"no valid {key!r}")
        except ValueError as exc:  # UnicodeDecodeError too
            raise OutputError(self.damaged(where, f"damaged ({one_line(exc, 80)})")) from None
        return state

    def read_run(self) -> dict[str, Any] | None:
        """``run.json``: the recorded run's id and identity (None: none recorded)."""
        return self.read_state(RUN, {"run_id": str, "identity": dict})

    def write_run(self, run_id: str, identity: dict[str, Any]) -> None:
        body = {"run_id": run_id, "identity": identity, "generation": self.generation}
        self.write(self.path(RUN), json.dumps(body, indent=1).encode())

    def read_manifest(self) -> Manifest | None:
        """The last run's manifest (None when absent). Raises OutputError when damaged."""
        state = self.read_state(MANIFEST, {"run_id": str, "counts": dict})
        return Manifest.from_dict(state) if state is not None else None

    def write_manifest(self, manifest: Manifest) -> None:
        self.write(self.path(MANIFEST), manifest.to_json())

    def complete(self) -> bool:
        """``_SUCCESS`` is there: every shard of the plan was committed.

        Raises:
            OutputError: a folder is in its place.
        """
        fs, path = storage.resolve(self.path(SUCCESS), self.opts)
        kind = storage.retry(lambda: fs.get_file_info(path), f"checking {self.path(SUCCESS)}").type
        if kind == storage.pafs.FileType.Directory:
            raise OutputError(not_a_file(self.path(SUCCESS)))
        return kind == storage.pafs.FileType.File

    def mark_complete(self, run_id: str) -> None:
        """Write ``_SUCCESS`` (its body names the run and generation, so no two are the same object)."""
        self.write(self.path(SUCCESS), json.dumps({"run_id": run_id, "generation": self.generation}).encode())

    def probe(self, token: str) -> str:
        """Where a run writes the token its actors read back (do they see the output?)."""
        return self.path(STATE, f"probe-{token}")

    # --- whole-output changes --------------------------------------------------------------------
    def holds_results(self) -> bool:
        """Anything is there but the lease's own files (a fresh output holds nothing else)."""
        lease = {LEASE, LEASE_LOCK}
        if self.s3:
            state = [f"{STATE}/{n}" for n in storage.list_names(self.path(STATE), self.opts)]
            if any(n not in lease for n in state):
                return True
            folders = [self.uri, *(self.path(sub) for sub in (HEATMAPS, PLAN, AGGREGATE))]
            return any(storage.list_names(f, self.opts) for f in folders)
        path = self.local_path()
        if not os.path.isdir(path):
            return False
        for root, _, files in os.walk(path):
            rel = os.path.relpath(root, path)
            for name in files:
                if os.path.normpath(os.path.join(rel, name)) not in lease:
                    return True
        return False

    def clear_results(self) -> None:
        """Delete the heatmaps, the plan and every record of a run (``--overwrite``, or a failed run
        on a fresh output); the lease's files stay (never deleted: every process must lock the same
        lock file, and generations only grow)."""
        self.delete(self.path(RUN))  # first: an output being cleared can no longer be resumed
        for sub in (HEATMAPS, AGGREGATE, PLAN):
            self.delete_tree(self.path(sub))
        for name in (MANIFEST, SUCCESS, REPORT):
            self.delete(self.path(name))
        for name in storage.list_names(self.path(STATE), self.opts):
            if name.startswith("probe-"):
                self.delete(self.path(STATE, name))

    def mark_incomplete(self) -> None:
        """The output stops claiming completeness (before it changes): no ``_SUCCESS``, no manifest."""
        for name in (SUCCESS, MANIFEST):
            self.delete(self.path(name))

    def remove_temporaries(self) -> None:
        """Temporaries of writers killed earlier (in the output's top folder and heatmaps/)."""
        if not self.s3:
            with self._fenced():
                for folder in (self.uri, self.path(HEATMAPS)):
                    storage.remove_temporaries(folder, self.opts)

    def damaged(self, where: str, what: str) -> str:
        """The one line for a state file that is ``what`` (missing, damaged): which file, and what
        to do."""
        if where.startswith(self.path(STATE) + "/"):
            todo = f"rerun with --overwrite to start the output afresh, or delete {self.path(STATE)}/"
        else:
            todo = "rerun the same lnstd run to rewrite it, or delete it"
        return f"{where} is {what}; {todo}"


def not_a_file(where: str) -> str:
    """The one line for a folder (or a device, a FIFO) where the output has a file."""
    return f"{where} is not a file (a folder or another kind of entry is in its place); remove it and rerun"
