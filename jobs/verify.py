"""``lnstd verify OUTPUT``: an output checked against its manifest and plan; ``--repair`` removes
what no committed run wrote.

Reads one part's footer and its ``image_id``/``method``/``target`` columns at a time (and the
plan's record batch for that shard), so its memory does not grow with the dataset.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from lnstd import storage
from lnstd.config import Target
from lnstd.errors import LnstdError, one_line
from lnstd.output import HEATMAPS, SUCCESS, Footer, Manifest, Output, shard_of
from lnstd.plan import Plan

__all__ = ["Verdict", "command", "repair", "verify"]


@dataclass
class Verdict:
    """What :func:`verify` found: one line per check, and the heatmap files no committed run wrote
    (``stray``: removable) and the plan's shards without a good part (``missing``)."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(good for _, good, _ in self.checks)

    def add(self, name: str, good: bool, detail: str) -> None:
        self.checks.append((name, good, detail))

    def table(self) -> str:
        """One line per check: ``ok``/``FAIL``, the check, what was found."""
        width = max(len(n) for n, _, _ in self.checks)
        return "\n".join(f"{'ok  ' if g else 'FAIL'}  {n:<{width}}  {d}" for n, g, d in self.checks)


def _shown(items: list, n: int = 5) -> str:
    return ", ".join(str(x) for x in items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def verify(out: Output) -> Verdict:
    """Check ``out``: its manifest and run record, its plan, and every file under ``heatmaps/``
    (a part of the plan's shards, readable, written by the manifest's run, holding exactly its
    shard's inputs, once per method and target), and that ``_SUCCESS`` stands only over a complete
    output."""
    v = Verdict()
    try:
        manifest = out.read_manifest()
        run = out.read_run()
        plan = Plan.load(out)
    except LnstdError as exc:
        v.add("records", False, one_line(exc))
        return v
    if manifest is None or run is None or plan is None:
        absent = [
            n
            for n, x in (("_manifest.json", manifest), ("_lnstd/run.json", run), ("plan", plan))
            if x is None
        ]
        v.add("records", False, f"no {', '.join(absent)}: no run has finished here")
        return v
    same = manifest.run_id == run["run_id"]
    v.add(
        "records", same, f"run {manifest.run_id}" + ("" if same else f", but run.json says {run['run_id']}")
    )
    good_counts = _check_parts(out, plan, manifest, v)
    c = manifest.counts
    agree = (c.get("images"), c.get("ok"), c.get("errors")) == (
        plan.inputs,
        good_counts["ok"],
        good_counts["errors"],
    )
    m = f"manifest: {c.get('images')} images, {c.get('ok')} ok, {c.get('errors')} errors"
    p = f"parts: {good_counts['images']} images, {good_counts['ok']} ok, {good_counts['errors']} errors"
    v.add("counts", agree, f"{m}; {p}")
    complete = out.complete()
    state = "present" if complete else "absent"
    gaps = (
        f"{len(v.missing)} shards have no good part" if v.missing else "every shard of the plan has its part"
    )
    v.add("_SUCCESS", complete == (not v.missing and not v.stray), f"{state}; {gaps}")
    return v


def _check_parts(out: Output, plan: Plan, manifest: Manifest, v: Verdict) -> dict[str, int]:
    methods = len(manifest.identity.get("methods") or manifest.config.get("methods") or [])
    target = Target.parse(str(manifest.identity.get("target", "predicted")))
    topk = target.k if target.kind == "topk" else None
    totals = {"images": 0, "ok": 0, "errors": 0}
    seen: set[int] = set()
    problems: list[str] = []
    for name in storage.list_names(out.path(HEATMAPS), out.opts):
        shard = shard_of(name)
        f = out.footer(shard) if shard is not None and shard < plan.shards else None
        why = (
            _part_problem(out, plan, manifest.run_id, shard, f, methods, topk)
            if shard is not None
            else "not a part"
        )
        if why is not None:
            v.stray.append(out.path(HEATMAPS, name))
            problems.append(f"{name} ({why})")
            continue
        assert shard is not None
        seen.add(shard)
        for k in totals:
            totals[k] += int(f.counts.get(k, 0)) if f else 0
    v.missing = sorted(set(range(plan.shards)) - seen)
    v.add("parts", not problems, f"{len(seen)} of {plan.shards} parts good" +
          (f"; not this run's or damaged: {_shown(problems)}" if problems else ""))  # fmt: skip
    return totals


def _part_problem(
    out: Output, plan: Plan, run_id: str, shard: int, f: Footer | None, methods: int, topk: int | None
) -> str | None:
    """Why shard ``shard``'s part (its footer ``f``) is not a committed part of this run (None: it is)."""
    if shard >= plan.shards:
        return f"shard {shard} is not in the plan's {plan.shards}"
    if f is None:
        return "unreadable"
    if f.run_id != run_id:
        return f"written by run {f.run_id or '?'}"
    fs, path = storage.resolve(out.part(shard), out.opts)
    try:
        t = pq.read_table(path, filesystem=fs, columns=["image_id", "method", "target"])
    except (OSError, ValueError) as exc:
        return f"unreadable ({one_line(exc, 60)})"
    want = {it.image_id for it in plan.read_shard(shard)}
    ids = t.column("image_id").to_pylist()
    if set(ids) != want:
        return f"its images are not its shard's ({len(set(ids) ^ want)} differ)"
    keys = collections.Counter(
        zip(ids, t.column("method").to_pylist(), t.column("target").to_pylist(), strict=True)
    )
    if any(n > 1 for n in keys.values()):
        return "a row repeated (same image, method and target)"
    per_image = collections.Counter(i for i, _, _ in keys)
    if methods and any(n % methods or (topk is None and n != methods) for n in per_image.values()):
        return "not one row per method (and target) for each image"
    return None


def repair(out: Output, ttl: float = 60.0) -> list[str]:
    """Remove, under the output's lease, the heatmap files :func:`verify` found no committed run
    wrote, and ``_SUCCESS`` if the output is then incomplete; returns what was removed.

    Raises:
        OutputLockedError: a run holds the output now.
    """
    from .lease import Lease

    lease = Lease(out, ttl=ttl)
    lease.acquire()
    try:
        out.fence_with(lease.fenced, lease.generation, ttl)
        v = verify(out)
        removed = list(v.stray)
        for uri in v.stray:
            out.delete(uri)
        if v.missing and out.complete():  # a stray removed leaves the plan's parts as they were
            out.delete(out.path(SUCCESS))
            removed.append(out.path(SUCCESS))
        return removed
    finally:
        lease.release()


def command(output: str, s3_endpoint: str | None, fix: bool) -> int:
    """``lnstd verify OUTPUT [--repair]``: what was removed (with ``fix``), then the table; 0 when
    every check passes, else 1."""
    out = Output(output, storage.StorageOptions.from_env(s3_endpoint))
    if fix:
        removed = repair(out)
        for uri in removed:
            print(f"removed {uri}")
        if removed:
            print("rerun the same lnstd run to redo the shards whose parts were removed")
    verdict = verify(out)
    print(verdict.table())
    return 0 if verdict.ok else 1
