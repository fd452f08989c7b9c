"""Where everything lives in a run's output (local folder or S3 prefix): the one place that knows.

Only the heatmap rows are Parquet (``heatmaps/part-NNNNN.parquet``, one file per committed shard);
everything else starts with ``_`` (dataset readers such as pyarrow, pandas and Spark skip those) and
none of it ends in ``.parquet`` (DuckDB's and Polars' globs take every ``*.parquet``). So a reader
pointed at the output folder gets the heatmap rows and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from . import storage
from .errors import OutputError, one_line
from .metrics.registry import MASK_METRICS

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
    "SUCCESS",
    "Footer",
    "part_footer",
    "part_name",
    "part_uri",
    "read_state",
    "row_fields",
    "shard_counts",
    "shard_of",
]

HEATMAPS = "heatmaps"  # the dataset: part-NNNNN.parquet
SUCCESS = "_SUCCESS"  # every shard of the plan is committed
MANIFEST = "_manifest.json"  # configuration, versions, counts and timings of the last run
REPORT = "_report.html"  # the report page
AGGREGATE = "_aggregate"  # summary.csv, per_class.csv, counts.json
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


def part_uri(output: str, shard: int) -> str:
    """Where shard ``shard``'s heatmaps are committed."""
    return uri(output, HEATMAPS, part_name(shard))


@dataclass(frozen=True)
class Footer:
    """What a committed part says of itself: its shard's counts, its rows and the run that wrote it."""

    counts: dict[str, int]
    rows: int
    run_id: str


def part_footer(output: str, shard: int, opts: storage.StorageOptions) -> Footer | None:
    """The footer of shard ``shard``'s part, or None if the part is missing or unreadable
    (truncated, empty, not Parquet)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(part_uri(output, shard), opts)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f)
        kv = meta.metadata or {}
        counts = json.loads(kv.get(SHARD_COUNTS, b"{}"))
        return Footer(counts, meta.num_rows, kv.get(b"lnstd.run_id", b"").decode())
    except (OSError, ValueError):
        return None


def shard_counts(output: str, shard: int, opts: storage.StorageOptions) -> dict[str, int]:
    """The counts a committed shard recorded in its Parquet footer (empty if unreadable)."""
    footer = part_footer(output, shard, opts)
    return footer.counts if footer else {}


def shard_of(name: str) -> int | None:
    """The shard number of a committed part file name, or None for any other name."""
    if name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit():
        return int(name[5:-8])
    return None


def uri(output: str, *parts: str) -> str:
    """``output`` joined with layout names."""
    return storage.join(output, *parts)


def read_state(
    output: str, name: str, opts: storage.StorageOptions, keys: dict[str, type] | None = None
) -> dict | None:
    """The JSON state file ``name`` of ``output`` (None when absent).

    Raises:
        OutputError: the file is not JSON, not an object, or lacks one of ``keys`` or has it of
            another type (a torn write, a hand edit): one line naming the file and what to do.
    """
    where = uri(output, name)
    try:
        data = storage.read_bytes(where, opts)
    except FileNotFoundError:
        return None
    try:
        state = json.loads(data)
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        for key, kind in (keys or {}).items():
            if not isinstance(state.get(key), kind):
                raise ValueError(f"no valid {key!r}")
    except ValueError as exc:  # UnicodeDecodeError too
        raise OutputError(damaged(output, where, f"damaged ({one_line(exc, 80)})")) from None
    return state


def damaged(output: str, where: str, what: str) -> str:
    """The one line for a state file of ``output`` that is ``what`` (missing, damaged): which file,
    and what to do."""
    if where.startswith(uri(output, "_lnstd") + "/"):
        todo = f"rerun with --overwrite to start the output afresh, or delete {uri(output, '_lnstd')}/"
    else:
        todo = "rerun the same lnstd run to rewrite it, or delete it"
    return f"{where} is {what}; {todo}"
