"""The shard plan: which inputs a run covers, in which shard, with their ids; written once, then read.

The first run lists the input and writes the plan into the output (``_lnstd/plan/``) before any
shard starts: Arrow IPC part files (``part-NNNNN.arrow``, up to a million inputs each) written while
the listing streams, then ``plan.json``, whose atomic write is the commit point (part files without
it are the leftovers of an interrupted listing and are rewritten). A resume reads the plan instead
of listing again, so shards never shift when the input changes. Inputs added later join only on
request (``--refresh-input``), as new shards after the last one; committed shards are never
reshuffled. Inputs that disappeared stay in the plan and get an error row ("missing at run time").

Memory: the listing streams; the duplicate check of a manifest keeps a 16-byte digest per input, and
the input check of a resume 16 bytes per input on each side (plan and listing).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lnstd import output as layout
from lnstd import storage
from lnstd.data import Item, Source
from lnstd.errors import InputError

__all__ = ["Plan", "PlanDiff"]

VERSION = 1
PART_ROWS = 1_000_000
SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.int64()),
        ("mask_uri", pa.string()),
        ("problem", pa.string()),
    ]
)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class PlanDiff:
    """How the input differs from the plan: counts, and the added inputs (when asked for)."""

    added: int
    removed: int
    added_items: list[Item]

    def notice(self, refresh: bool) -> str | None:
        """The one line a resume prints (None when nothing changed)."""
        if not self.added and not self.removed:
            return None
        parts = []
        if self.added:
            parts.append(
                f"{self.added} added (appended as new shards)"
                if refresh
                else f"{self.added} added (not in this run's plan: rerun with --refresh-input to add them)"
            )
        if self.removed:
            parts.append(
                f"{self.removed} removed (those in committed shards keep their rows; the others get an "
                "error row: missing at run time)"
            )
        return "the input changed since the plan was made: " + ", ".join(parts)


class Plan:
    """A committed plan of one output: read its shards, compare it with the input, extend it."""

    def __init__(self, output: str, meta: dict[str, Any], opts: storage.StorageOptions) -> None:
        self.output = output
        self.meta = meta
        self.opts = opts

    # --- where -----------------------------------------------------------------------------------
    @staticmethod
    def _dir(output: str) -> str:
        return layout.uri(output, layout.PLAN)

    @property
    def shards(self) -> int:
        return int(self.meta["shards"])

    @property
    def inputs(self) -> int:
        return int(self.meta["inputs"])

    # --- read ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, output: str, opts: storage.StorageOptions) -> Plan | None:
        """The committed plan of ``output``, or None if there is none."""
        uri = layout.uri(cls._dir(output), "plan.json")
        if not storage.exists(uri, opts):
            return None
        meta = json.loads(storage.read_bytes(uri, opts))
        if meta.get("version") != VERSION:
            raise InputError(f"{output}: plan version {meta.get('version')} is not {VERSION}")
        return cls(output, meta, opts)

    def _tables(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for part in self.meta["parts"]:
            data = storage.read_bytes(layout.uri(self._dir(self.output), part["name"]), self.opts)
            reader = ipc.open_file(pa.BufferReader(data))
            for k in range(reader.num_record_batches):
                batch = reader.get_batch(k)
                yield batch.select(columns) if columns else batch

    def iter_shards(self, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[int, list[Item]]]:
        """(shard, items) in shard order, streaming; shards in ``skip`` are passed over unread."""
        current, items = -1, []
        for batch in self._tables():
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                shard = cols["shard"][i]
                if shard != current:
                    if items and current not in skip:
                        yield current, items
                    current, items = shard, []
                if shard in skip:
                    continue
                items.append(Item(cols["image_id"][i], cols["uri"][i], cols["label"][i], cols["mask_uri"][i],
                                  cols["problem"][i]))  # fmt: skip
        if items and current not in skip:
            yield current, items

    # --- write -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        output: str,
        source: Source,
        shard_size: int,
        opts: storage.StorageOptions,
        dedupe: bool = False,
        part_rows: int = PART_ROWS,
    ) -> Plan:
        """List ``source`` once and commit the plan (ids checked unique, shards of ``shard_size``).

        Raises:
            InputError: the input is empty, or a manifest lists an id or uri twice (without
                ``dedupe``; the message names the rows).
        """
        storage.delete_tree(cls._dir(output), opts)  # an earlier, uncommitted listing's parts
        items = source.items() if source.unique_ids else _unique(source, dedupe)
        meta = {"version": VERSION, "input": source.uri, "shard_size": shard_size, "created": time.time()}
        parts, inputs, shards = _write_parts(output, items, 0, 0, shard_size, part_rows, opts)
        if inputs == 0:
            raise InputError(f"no images found in {source.uri}")
        meta.update(inputs=inputs, shards=shards, parts=parts)
        storage.write_bytes(
            layout.uri(cls._dir(output), "plan.json"), json.dumps(meta, indent=1).encode(), opts
        )
        return cls(output, meta, opts)

    def diff(self, source: Source, keep_added: bool) -> PlanDiff:
        """Compare the input as it is now with the plan, by image id.

        Digests are compared as NumPy arrays, never as elements read back into Python: reading one
        element of a fixed-width bytes array drops its trailing zero bytes, so a digest ending in
        one would not compare equal to itself.
        """
        planned = []
        for batch in self._tables(["image_id"]):
            planned.extend(_digest(v) for v in batch.column(0).to_pylist())
        plan_ids = np.unique(np.array(planned, dtype="S16"))
        del planned
        listed, added_items = [], []
        for item in source.items():
            d = np.array([_digest(item.image_id)], dtype="S16")
            listed.append(d[0])
            if keep_added:
                pos = np.searchsorted(plan_ids, d)
                if not (pos[0] < len(plan_ids) and (plan_ids[pos] == d)[0]):
                    added_items.append(item)
        now = np.unique(np.array(listed, dtype="S16"))
        added = int((~np.isin(now, plan_ids, assume_unique=True)).sum())
        removed = int((~np.isin(plan_ids, now, assume_unique=True)).sum())
        return PlanDiff(added, removed, added_items)

    def extend(self, items: list[Item]) -> list[int]:
        """Append ``items`` as new shards after the last one; returns the new shard numbers."""
        if not items:
            return []
        size = int(self.meta["shard_size"])
        first = self.shards
        parts, inputs, shards = _write_parts(
            self.output, iter(items), len(self.meta["parts"]), first, size, PART_ROWS, self.opts
        )
        self.meta["parts"] = [*self.meta["parts"], *parts]
        self.meta["inputs"] = self.inputs + inputs
        self.meta["shards"] = first + shards
        storage.write_bytes(
            layout.uri(self._dir(self.output), "plan.json"),
            json.dumps(self.meta, indent=1).encode(),
            self.opts,
        )
        return list(range(first, first + shards))


def _write_parts(
    output: str,
    items: Iterator[Item],
    first_part: int,
    first_shard: int,
    shard_size: int,
    part_rows: int,
    opts: storage.StorageOptions,
) -> tuple[list[dict[str, Any]], int, int]:
    """Stream items into Arrow part files; returns (parts, inputs, shards)."""
    parts: list[dict[str, Any]] = []
    inputs = 0
    for k in itertools.count(first_part):
        chunk = list(itertools.islice(items, part_rows))
        if not chunk:
            break
        shard = [first_shard + (inputs + i) // shard_size for i in range(len(chunk))]
        table = pa.table(
            {
                "shard": pa.array(shard, pa.int32()),
                "image_id": [it.image_id for it in chunk],
                "uri": [it.uri for it in chunk],
                "label": pa.array([it.label for it in chunk], pa.int64()),
                "mask_uri": pa.array([it.mask_uri for it in chunk], pa.string()),
                "problem": pa.array([it.problem for it in chunk], pa.string()),
            },
            schema=SCHEMA,
        )
        buf = io.BytesIO()
        with ipc.new_file(buf, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=65536)
        name = f"part-{k:05d}.arrow"
        storage.write_bytes(layout.uri(Plan._dir(output), name), buf.getvalue(), opts)
        parts.append({"name": name, "inputs": len(chunk), "first_shard": shard[0], "last_shard": shard[-1]})
        inputs += len(chunk)
    shards = (inputs + shard_size - 1) // shard_size
    return parts, inputs, shards


def _unique(source: Source, dedupe: bool) -> Iterator[Item]:
    """The items of ``source`` with unique ids and uris: later repeats are dropped (``dedupe``) or
    refused, naming the rows (after the whole listing, so that every repeat is named at once)."""
    ids: set[bytes] = set()
    uris: set[bytes] = set()
    repeats: list[tuple[int, str, str]] = []  # (row, what, value)
    for row, item in enumerate(source.items(), start=1):
        di, du = _digest(item.image_id), _digest(item.uri)
        if di in ids or du in uris:
            if not dedupe:
                what, value = ("image_id", item.image_id) if di in ids else ("uri", item.uri)
                repeats.append((row, what, value))
            continue
        ids.add(di)
        uris.add(du)
        if not repeats:
            yield item
    if repeats:
        raise InputError(_repeats_message(source, repeats))


def _repeats_message(source: Source, repeats: list[tuple[int, str, str]]) -> str:
    first: dict[tuple[str, str], int] = {}
    wanted = {(w, v) for _, w, v in repeats}
    for row, item in enumerate(source.items(), start=1):
        for key in (("image_id", item.image_id), ("uri", item.uri)):
            if key in wanted and key not in first:
                first[key] = row
    shown = "; ".join(
        f"rows {first.get((w, v), '?')} and {row} have the same {w} {v!r}" for row, w, v in repeats[:3]
    )
    more = f" (and {len(repeats) - 3} more)" if len(repeats) > 3 else ""
    return (
        f"{source.uri}: every input needs its own id: {shown}{more}; remove the repeats, give them "
        "distinct image_id values, or pass --dedupe to keep the first of each"
    )
