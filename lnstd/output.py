"""Where everything lives in a run's output (local folder or S3 prefix): the one place that knows.

Only the heatmap rows are Parquet (``heatmaps/part-NNNNN.parquet``, one file per committed shard);
everything else starts with ``_`` (dataset readers such as pyarrow, pandas and Spark skip those) and
none of it ends in ``.parquet`` (DuckDB's and Polars' globs take every ``*.parquet``). So a reader
pointed at the output folder gets the heatmap rows and nothing else.
"""

from __future__ import annotations

import json

from . import storage

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
    "part_name",
    "part_uri",
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


def part_name(shard: int) -> str:
    """File name of a shard's heatmaps."""
    return f"part-{shard:05d}.parquet"


def part_uri(output: str, shard: int) -> str:
    """Where shard ``shard``'s heatmaps are committed."""
    return uri(output, HEATMAPS, part_name(shard))


def shard_counts(output: str, shard: int, opts: storage.StorageOptions) -> dict[str, int]:
    """The counts a committed shard recorded in its Parquet footer (empty if unreadable)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(part_uri(output, shard), opts)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta.get(SHARD_COUNTS, b"{}"))
    except (OSError, ValueError):
        return {}


def shard_of(name: str) -> int | None:
    """The shard number of a committed part file name, or None for any other name."""
    if name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit():
        return int(name[5:-8])
    return None


def uri(output: str, *parts: str) -> str:
    """``output`` joined with layout names."""
    return storage.join(output, *parts)
