"""The shard plan: which inputs a run covers, in which shard, with their ids; written once, then read.

The first run lists the input and writes the plan into the output (``_lnstd/plan/``), under the
output's lease, before any shard starts: zstd-compressed Arrow IPC part files
(``part-NNNNN.arrow``, whole shards, up to about a million inputs or 4,096 shards each) written
while the listing streams, one record batch per shard, then ``plan.json``, whose atomic write is
the commit point
(part files without it are the leftovers of an interrupted listing; the next run removes them and
lists again). Nothing is staged outside the output.

An actor reads the items of its shard itself (:meth:`Plan.read_shard`: the part's footer and one
record batch, by random access, from a local folder or S3), so the driver deals in shard numbers
only. A resume reads the plan instead of listing again, so shards never shift when the input
changes. Inputs added later join only on request (``--refresh-input``), as new shards after the
last one; committed shards are never reshuffled. Inputs that disappeared stay in the plan and get
an error row ("missing at run time") unless their shard was already committed.

Memory (what the driver holds, per input): the listing streams, one shard at a time. The duplicate
check of a manifest keeps two 8-byte hashes per input (id and uri; a hash collision is verified
against the strings, so it never refuses a valid input) and the input check of a resume a 16-byte
digest per input on each side (plan and listing). Nothing else grows with the number of inputs.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from . import storage
from .data import Item, Source
from .errors import InputError, OutputError, one_line
from .output import PLAN, Output

__all__ = ["Plan", "PlanDiff"]

VERSION = 2
PART_ROWS = 1_000_000
# At most this many shards per part file: an actor reads its part's footer (24 bytes per shard in
# it) to find its one record batch, so a part of small shards stays about 100 KB to open.
PART_SHARDS = 4096
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.int64()),
        ("mask_uri", pa.string()),
        ("problem", pa.string()),
    ]
)
_WRITE = ipc.IpcWriteOptions(compression="zstd")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _hash64(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


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

    def __init__(self, out: Output, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self._firsts: list[int] | None = None  # each part's first shard (for _part_of)

    # --- where -----------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return self.out.path(PLAN, name)

    @property
    def shards(self) -> int:
        return int(self.meta["shards"])

    @property
    def inputs(self) -> int:
        return int(self.meta["inputs"])

    @property
    def bytes(self) -> int:
        """The plan's size in the output (its part files)."""
        return sum(int(p.get("bytes", 0)) for p in self.meta["parts"])

    # --- read ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, out: Output) -> Plan | None:
        """The committed plan of ``out``, or None if there is none."""
        keys = {"version": int, "input": str, "shard_size": int, "inputs": int, "shards": int, "parts": list}
        meta = out.read_state(f"{PLAN}/plan.json", keys)
        if meta is None:
            # Part files without plan.json are an interrupted listing, unless a run used the plan
            # (its run.json, or heatmaps, are there): then the commit point was lost, and listing
            # again could shift shards under committed parts.
            if storage.list_names(out.path(PLAN), out.opts) and (
                out.read_run() is not None or out.committed()
            ):
                raise OutputError(out.damaged(out.path(PLAN, "plan.json"), "missing"))
            return None
        if meta["version"] != VERSION:
            raise InputError(f"{out.uri}: plan version {meta['version']} is not {VERSION}")
        plan = cls(out, meta)
        plan._check_shards()
        plan._check_parts()
        return plan

    def _check_parts(self) -> None:
        """Every part the plan names is there and has its footer (a torn or lost part is the output's
        damage, said in one line, not a failure later in some shard)."""
        present = set(storage.list_names(self.out.path(PLAN), self.out.opts))
        for part in self.meta["parts"]:
            name = part.get("name") if isinstance(part, dict) else None
            where = self._file(str(name))
            if not isinstance(name, str) or name not in present:
                raise OutputError(self.out.damaged(where, "missing"))
            fs, path = storage.resolve(where, self.out.opts)
            try:
                with fs.open_input_file(path) as f:
                    ipc.open_file(f).num_record_batches  # noqa: B018 (reads and checks the footer)
            except (pa.ArrowInvalid, OSError) as exc:
                why = f"damaged ({one_line(exc, 80)})"
                raise OutputError(self.out.damaged(where, why)) from None

    def _check_shards(self) -> None:
        """plan.json's counts agree with its parts (consecutive shard ranges from 0)."""
        where = self._file("plan.json")
        try:
            expect, inputs = 0, 0
            for part in self.meta["parts"]:
                if int(part["first_shard"]) != expect or int(part["last_shard"]) < expect:
                    raise ValueError
                expect, inputs = int(part["last_shard"]) + 1, inputs + int(part["inputs"])
            if expect != self.shards or inputs != self.inputs:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise OutputError(
                self.out.damaged(where, "damaged (its counts disagree with its parts)")
            ) from None

    def clean(self) -> int:
        """Remove files of the plan's folder that the committed plan does not name (parts of a listing
        or an extension that was interrupted); returns how many. Called under the lease."""
        keep = {"plan.json", *(p["name"] for p in self.meta["parts"])}
        stray = [n for n in storage.list_names(self.out.path(PLAN), self.out.opts) if n not in keep]
        for name in stray:
            self.out.delete(self._file(name))
        return len(stray)

    def reload(self) -> None:
        """Read ``plan.json`` again (another process may have extended the plan)."""
        fresh = Plan.load(self.out)
        if fresh is not None:
            self.meta, self._firsts = fresh.meta, None

    def _part_of(self, shard: int) -> tuple[dict[str, Any], int]:
        parts = self.meta["parts"]  # in shard order: a listing's parts, then each extension's
        if self._firsts is None or len(self._firsts) != len(parts):
            self._firsts = [int(part["first_shard"]) for part in parts]
        k = bisect.bisect_right(self._firsts, shard) - 1
        if k >= 0:
            part = parts[k]
            first = self._firsts[k]
            last = int(part.get("last_shard", first + int(part.get("shards", 1)) - 1))
            if shard <= last:
                return part, shard - first
        raise KeyError(f"shard {shard} is not in the plan of {self.out.uri}")

    def shard_inputs(self, shard: int) -> int:
        """How many inputs shard ``shard`` holds."""
        part, index = self._part_of(shard)
        size = int(self.meta["shard_size"])
        last = int(part["last_shard"]) - int(part["first_shard"])
        return size if index < last else int(part["inputs"]) - last * size

    def read_shard(self, shard: int) -> list[Item]:
        """The items of one shard, read from its part file alone (random access: its footer and one
        record batch)."""
        if shard >= self.shards:
            self.reload()
        part, index = self._part_of(shard)
        fs, path = storage.resolve(self._file(part["name"]), self.out.opts)
        with fs.open_input_file(path) as f:
            return _items([ipc.open_file(f).get_batch(index)])

    def _batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for part in self.meta["parts"]:
            fs, path = storage.resolve(self._file(part["name"]), self.out.opts)
            with fs.open_input_file(path) as f:
                reader = ipc.open_file(f)
                for k in range(reader.num_record_batches):
                    batch = reader.get_batch(k)
                    yield batch.select(columns) if columns else batch

    def mask_uris(self, ids: Iterable[str]) -> dict[str, str]:
        """The mask of each of ``ids`` that has one (one streaming pass over the plan)."""
        wanted = pa.array(sorted(set(ids)), pa.string())
        found: dict[str, str] = {}
        for batch in self._batches(["image_id", "mask_uri"]):
            hit = batch.filter(pa.compute.is_in(batch.column(0), value_set=wanted))
            for image_id, mask in zip(*(hit.column(k).to_pylist() for k in range(2)), strict=True):
                if mask:
                    found[image_id] = mask
        return found

    # --- write -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, out: Output, source: Source, shard_size: int, dedupe: bool = False, part_rows: int = PART_ROWS
    ) -> Plan:
        """List ``source`` once and commit the plan (ids checked unique, shards of ``shard_size``).

        Raises:
            InputError: the input is empty, or a manifest lists an id or uri twice (without
                ``dedupe``; the message names the rows).
        """
        folder = out.path(PLAN)
        out.delete_tree(folder)  # an earlier, uncommitted listing's parts
        check = None if source.unique_ids else _Repeats()
        items = source.items() if check is None else check.watch(source.items())
        parts, inputs, shards = _write_parts(out, items, 0, 0, shard_size, part_rows)
        if check is not None:
            repeats = check.verify(source)
            if repeats and not dedupe:
                out.delete_tree(folder)
                raise InputError(_repeats_message(source, repeats))
            if repeats:  # list again, without the later repeats
                out.delete_tree(folder)
                drop = {row for row, _, _ in repeats}
                kept = (it for row, it in enumerate(source.items(), start=1) if row not in drop)
                parts, inputs, shards = _write_parts(out, kept, 0, 0, shard_size, part_rows)
        if inputs == 0:
            raise InputError(f"no images found in {source.uri}")
        meta = {"version": VERSION, "input": source.uri, "shard_size": shard_size, "created": time.time()}
        meta.update(inputs=inputs, shards=shards, parts=parts)
        plan = cls(out, meta)
        plan._commit()
        return plan

    def _commit(self) -> None:
        """Write ``plan.json``: the commit point of a listing or an extension."""
        self.out.write(self._file("plan.json"), json.dumps(self.meta, indent=1).encode())

    def digests(self) -> np.ndarray:
        """The sorted, unique 16-byte digests of the plan's image ids (16 bytes per input)."""
        out = bytearray()
        for batch in self._batches(["image_id"]):
            for v in batch.column(0).to_pylist():
                out += _digest(v)
        return np.unique(np.frombuffer(bytes(out), dtype="S16"))

    def diff(self, source: Source, keep_added: bool) -> PlanDiff:
        """Compare the input as it is now with the plan, by image id.

        Digests are compared as NumPy arrays, never as elements read back into Python: reading one
        element of a fixed-width bytes array drops its trailing zero bytes, so a digest ending in
        one would not compare equal to itself.
        """
        plan_ids = self.digests()
        listed = bytearray()
        added_items = []
        for item in source.items():
            raw = _digest(item.image_id)
            listed += raw
            if keep_added:
                d = np.frombuffer(raw, dtype="S16")
                pos = np.searchsorted(plan_ids, d)
                if not (pos[0] < len(plan_ids) and (plan_ids[pos] == d)[0]):
                    added_items.append(item)
        now = np.unique(np.frombuffer(bytes(listed), dtype="S16"))
        del listed
        added = int((~np.isin(now, plan_ids, assume_unique=True)).sum())
        removed = int((~np.isin(plan_ids, now, assume_unique=True)).sum())
        return PlanDiff(added, removed, added_items)

    def extend(self, items: list[Item]) -> list[int]:
        """Append ``items`` as new shards after the last one; returns the new shard numbers."""
        if not items:
            return []
        size = int(self.meta["shard_size"])
        first = self.shards
        parts, inputs, shards = _write_parts(self.out, iter(items), len(self.meta["parts"]), first, size)
        self.meta["parts"] = [*self.meta["parts"], *parts]
        self.meta["inputs"] = self.inputs + inputs
        self.meta["shards"] = first + shards
        self._commit()
        return list(range(first, first + shards))


def _items(batches: list[pa.RecordBatch]) -> list[Item]:
    out = []
    for batch in batches:
        c = batch.to_pydict()
        out.extend(
            Item(c["image_id"][i], c["uri"][i], c["label"][i], c["mask_uri"][i], c["problem"][i])
            for i in range(batch.num_rows)
        )
    return out


def _write_parts(
    out: Output,
    items: Iterator[Item],
    first_part: int,
    first_shard: int,
    shard_size: int,
    part_rows: int = PART_ROWS,
) -> tuple[list[dict[str, Any]], int, int]:
    """Stream items into compressed Arrow part files, one record batch per shard and whole shards
    per part; returns (parts, inputs, shards). Memory: one shard's items and one part's bytes."""
    shards_per_part = max(1, min(part_rows // shard_size, PART_SHARDS))
    parts: list[dict[str, Any]] = []
    inputs = shards = 0
    buf: io.BytesIO | None = None
    writer = None
    in_part = 0

    def close() -> None:
        nonlocal buf, writer, in_part
        if writer is None:
            return
        writer.close()
        name = f"part-{first_part + len(parts):05d}.arrow"
        data = buf.getvalue()
        out.write(out.path(PLAN, name), data)
        first = first_shard + shards - in_part
        parts.append({"name": name, "inputs": part_inputs[0], "first_shard": first,
                      "last_shard": first + in_part - 1, "bytes": len(data)})  # fmt: skip
        buf, writer, in_part = None, None, 0
        part_inputs[0] = 0

    part_inputs = [0]
    while True:
        chunk = list(itertools.islice(items, shard_size))
        if not chunk:
            break
        if writer is None:
            buf = io.BytesIO()
            # the generation makes each listing's bytes (and S3 ETag) its own: a conditional delete
            # of an earlier listing's part never matches this one
            meta = {b"lnstd.generation": str(out.generation).encode()}
            writer = ipc.new_file(buf, SCHEMA.with_metadata(meta), options=_WRITE)
        writer.write_batch(
            pa.record_batch(
                [
                    pa.array([it.image_id for it in chunk], pa.string()),
                    pa.array([it.uri for it in chunk], pa.string()),
                    pa.array([it.label for it in chunk], pa.int64()),
                    pa.array([it.mask_uri for it in chunk], pa.string()),
                    pa.array([it.problem for it in chunk], pa.string()),
                ],
                schema=SCHEMA,
            )
        )
        inputs += len(chunk)
        part_inputs[0] += len(chunk)
        shards += 1
        in_part += 1
        if in_part == shards_per_part:
            close()
        if len(chunk) < shard_size:
            break
    close()
    return parts, inputs, shards


class _Hashes:
    """8-byte hashes in fixed chunks of a million (no reallocation that would hold two copies)."""

    CHUNK = 1 << 20

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.fill = self.CHUNK

    def append(self, h: int) -> None:
        if self.fill == self.CHUNK:
            self.chunks.append(np.empty(self.CHUNK, np.uint64))
            self.fill = 0
        self.chunks[-1][self.fill] = h
        self.fill += 1

    def repeated(self) -> set[int]:
        """The values that occur more than once. Each chunk is sorted in place; repeats within a
        chunk are neighbours, repeats across chunks are found pairwise (no concatenated copy)."""
        if self.chunks:
            self.chunks[-1] = self.chunks[-1][: self.fill]
        for c in self.chunks:
            c.sort()
        found: set[int] = set()
        for i, a in enumerate(self.chunks):
            found.update(a[1:][a[1:] == a[:-1]].tolist())
            for b in self.chunks[i + 1 :]:  # b is sorted: a binary search per value of a
                at = np.minimum(np.searchsorted(b, a), len(b) - 1)
                found.update(a[b[at] == a].tolist())
        self.chunks = []
        return found


class _Repeats:
    """The duplicate check of a listing whose ids are not unique by construction (a manifest).

    While the listing streams, two 8-byte hashes per input (id and uri) go into compact arrays;
    :meth:`verify` then finds the rows whose hash repeats and confirms them against the strings, in
    a second pass that keeps only those candidates. Memory: 16 bytes per input."""

    def __init__(self) -> None:
        self.ids = _Hashes()
        self.uris = _Hashes()

    def watch(self, items: Iterator[Item]) -> Iterator[Item]:
        for item in items:
            self.ids.append(_hash64(item.image_id))
            self.uris.append(_hash64(item.uri))
            yield item

    def verify(self, source: Source) -> list[tuple[int, str, str]]:
        """The true repeats as (row, "image_id" | "uri", value), rows counted from 1, in order."""
        suspect = [self.ids.repeated(), self.uris.repeated()]
        if not any(suspect):
            return []
        seen: set[tuple[str, str]] = set()
        repeats = []
        for row, item in enumerate(source.items(), start=1):
            keys = [
                (what, value)
                for what, value, hashes in (
                    ("image_id", item.image_id, suspect[0]),
                    ("uri", item.uri, suspect[1]),
                )
                if hashes and _hash64(value) in hashes
            ]
            hit = next((k for k in keys if k in seen), None)
            if hit:  # a repeat: its keys are not recorded (as if the row were not there)
                repeats.append((row, *hit))
            else:
                seen.update(keys)
        return repeats


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
