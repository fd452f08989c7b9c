"""``lnstd run``: start -> schedule -> finish.

:func:`run` validates without writing (:mod:`.validate`), claims the output's lease (:mod:`.lease`),
commits or reads the shard plan (:class:`lnstd.plan.Plan`) and checks the parts already committed,
then starts the replicas (:mod:`.pool`) and runs the shards (:mod:`.scheduler`; each actor,
:mod:`.worker`, commits one Parquet file per shard), and finishes with the manifest, ``_SUCCESS`` and
the report. docs/architecture.md gives the order, the invariants and why each holds.
"""

from __future__ import annotations

import contextlib
import platform
import queue
import time
import traceback
import uuid
from dataclasses import asdict, dataclass

from lnstd import storage
from lnstd.aggregate import plural
from lnstd.config import RunConfig
from lnstd.data import Source
from lnstd.errors import ConfigMismatchError, OutputError, one_line
from lnstd.output import Footer, Manifest, Output
from lnstd.plan import Plan
from lnstd.sysinfo import peak_rss_mb
from lnstd.weights import say_if_random

from .console import log
from .lease import Lease
from .scheduler import SHARD_TRIES, InputCheck, Scheduler, ShardSource
from .validate import previous_run, validate

__all__ = ["run", "verify_parts"]


@dataclass
class _Start:
    """Where a run starts from: its id, its plan, and the parts committed before it."""

    run_id: str
    plan: Plan
    resumed: bool  # the plan was committed by an earlier run
    committed: set[int]
    prior: dict[str, int]  # the committed parts' totals (images, ok, errors)


def run(
    cfg: RunConfig, progress: bool = True, report: bool = False, traceback_on_error: bool = False
) -> Manifest:
    """Run the job to completion (or resume it); returns the manifest written into the output.

    Order: validate (no writes) -> claim the output's lease (a second run stops here, in seconds)
    -> check the recorded run -> commit the plan (first run) -> start Ray and the actors -> shards
    -> manifest -> the report (with ``report``, while this run still holds the output). A run that
    fails on a fresh output leaves nothing of it behind but the lease's own files; a rerun of a
    finished output changes nothing in it.

    Raises:
        LnstdError subclasses for everything a user can act on (bad flags, model, input, output,
        a held lease, a different run in the output, resources the cluster lacks).
    """
    t_start = time.time()
    out = Output(cfg.output, storage.StorageOptions.from_env(cfg.s3_endpoint))
    cfg, source = validate(cfg, out)
    fresh = not out.holds_results()
    lease = Lease(out, ttl=cfg.lease_ttl)
    lease.acquire()
    out.fence_with(lease.fenced, lease.generation, cfg.lease_ttl)  # every write from here on
    try:
        start = _start(cfg, out, lease, source)
        if not cfg.refresh_input and start.committed >= set(range(start.plan.shards)):
            done = _finished_before(out, t_start)
            if done is not None:
                return done
        if start.committed:
            log(f"resuming: {len(start.committed)} of {start.plan.shards} shards already committed")
        say_if_random(cfg.weights)  # once, after the refusals (each one line), before Ray starts
        manifest = _attribute(cfg, out, lease, source, start, t_start, progress)
        if report:
            _report(out, traceback_on_error or cfg.verbose)
        return manifest
    except BaseException:
        # A fresh output whose run failed (a flag, the model, the cluster's resources) before a shard
        # committed: nothing of it is worth keeping. Only the holder cleans, under its fence; the
        # lease's files stay (its lock is never deleted, its generation only grows).
        try:
            if fresh and not out.committed():
                out.clear_results()
        except Exception:  # the lease is lost or the storage failed: leave it to the next run
            pass
        raise
    finally:
        try:
            lease.release()
        except OSError as exc:  # e.g. the disk is full: the output is as it was left; say so
            log(
                f"warning: could not release the output's lease ({one_line(exc)}); the next run takes it "
                f"over {cfg.lease_ttl:.0f} s after this one ends"
            )


def _start(cfg: RunConfig, out: Output, lease: Lease, source: Source) -> _Start:
    """Under the lease: check the recorded run, clear an overwritten output, commit the plan (listing
    the input once) or read the committed one, record the run, check the committed parts."""
    out.sweep_staging()  # first: no delayed write of an earlier holder can be published after this
    previous = previous_run(cfg, out)
    run_id = previous["run_id"] if previous and not cfg.overwrite else uuid.uuid4().hex[:12]
    lease.name_run(run_id)
    if cfg.overwrite:
        out.clear_results()
    plan = Plan.load(out)
    if plan is not None and (plan.meta["input"] != cfg.input or plan.meta["shard_size"] != cfg.shard_size):
        if previous is not None:
            raise ConfigMismatchError(f"{out.uri}: its shard plan is for another --input or --shard-size")
        plan = None  # a plan no run ever used: list again
    resumed = plan is not None
    if plan is not None:
        plan.clean()
    else:  # list once, into the output (ids checked here), before any actor waits for work
        plan = Plan.create(out, source, cfg.shard_size, dedupe=cfg.dedupe)
        skipped = source.notice()
        line = f"plan: {plural(plan.inputs, 'input')} in {plural(plan.shards, 'shard')}"
        line += f" of up to {cfg.shard_size}"
        log(line + (f"; {skipped}" if skipped else ""))
    out.write_run(run_id, cfg.identity())
    out.remove_temporaries()
    committed = out.committed()
    prior = verify_parts(out, plan, committed, run_id, len(cfg.methods), cfg.topk, heal=True)
    return _Start(run_id, plan, resumed, committed, prior)


def verify_parts(
    out: Output,
    plan: Plan,
    committed: set[int],
    run_id: str,
    methods: int,
    topk: int | None,
    heal: bool,
) -> dict[str, int]:
    """Check every committed part a run relies on against the plan: it is a shard of the plan, its
    footer is readable, it was written by this run, and it holds its shard's inputs and the rows
    they make. With ``heal``, parts that fail are removed (through ``out``, under the run's fence;
    their shards run again) and dropped from ``committed``; without, they are only dropped. Returns
    the totals of the good parts (from their footers)."""
    totals = {"images": 0, "ok": 0, "errors": 0}
    bad = []
    for s in sorted(committed):
        f = out.footer(s) if s < plan.shards else None
        good = (
            f is not None
            and f.run_id == run_id
            and f.counts.get("images") == plan.shard_inputs(s)
            and _rows_match(f, methods, topk)
        )
        if not good or f is None:
            bad.append(s)
            continue
        for k in totals:
            totals[k] += int(f.counts.get(k, 0))
    for s in bad:
        committed.discard(s)
    if bad and heal:
        out.mark_incomplete()
        for s in bad:
            out.delete(out.part(s))
        shown = ", ".join(str(s) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
        log(f"{len(bad)} committed part(s) unreadable, short or of another run: rewriting shard(s) {shown}")
    return totals


def _rows_match(f: Footer, methods: int, topk: int | None) -> bool:
    """A part's rows: one per method for an error image, one per method and target for the others
    (top-k: k targets, or fewer when the model has fewer classes)."""
    ok, errors = f.counts.get("ok", -1), f.counts.get("errors", -1)
    if ok < 0 or errors < 0:
        return False
    rest = f.rows - methods * errors
    if not topk or ok == 0:
        return rest == methods * ok
    return rest > 0 and rest % (methods * ok) == 0 and rest // (methods * ok) <= topk


def _finished_before(out: Output, t_start: float) -> Manifest | None:
    """A rerun of a finished job: its manifest and report stay the real run's; returns the manifest
    (None if the earlier run died before it wrote one: then this run writes it)."""
    if not out.complete():
        return None
    try:
        manifest = out.read_manifest()
    except OutputError:
        return None  # a damaged record: this run writes it again
    if manifest is None:
        return None
    c = manifest.counts
    log(
        f"done already: {c['images']} images ({c['ok']} ok, {c['errors']} errors) in "
        f"{c['shards']} shards -> {out.uri}; nothing to do ({time.time() - t_start:.1f} s)"
    )
    manifest.noop = True
    return manifest


def _attribute(
    cfg: RunConfig, out: Output, lease: Lease, source: Source, start: _Start, t_start: float, progress: bool
) -> Manifest:
    """Start Ray and the replicas, run the uncommitted shards, then :func:`_finish`."""
    from .pool import RayBackend, ReplicaPool, ray_init

    refresh: queue.Queue[int] | None = queue.Queue() if start.resumed else None
    check = None
    if refresh is not None:
        check = InputCheck(start.plan, source, cfg.refresh_input, refresh)
    shards = ShardSource(start.plan.shards, start.committed, refresh)
    pool: ReplicaPool | None = None
    sched: Scheduler | None = None
    checked: tuple[set[int], dict[str, int]] = (set(), {"images": 0, "ok": 0, "errors": 0})
    probe = out.probe(lease.token)
    out.write(probe, start.run_id.encode())
    try:
        if not shards.exhausted or check is not None:
            external = ray_init(cfg)
            backend = RayBackend(cfg, start.run_id, probe, (lease.token, lease.generation))
            pool = ReplicaPool(backend, cfg, external)
            pool.wait_first(cfg.startup_timeout)
        if check is not None:
            check.start()
        if pool is not None:
            sched = Scheduler(
                pool, shards, lease.lost, start.plan.inputs, cfg.startup_timeout, out.uri, progress
            )
            sched.run(start.prior["images"])
            checked = _redo_bad_parts(cfg, out, start, sched, shards)
            sched.close()
    except BaseException:
        if pool is not None:
            pool.stop()  # no actor of this run starts or commits another shard after it ends
        raise
    finally:
        with contextlib.suppress(Exception):  # else the next run's clean-up removes it
            out.delete(probe)
    if check is not None:
        check.join()
        if check.error:
            log(f"warning: the input check failed ({check.error}); the plan was finished as recorded")
    return _finish(cfg, out, start, sched, check, checked, t_start)


def _redo_bad_parts(
    cfg: RunConfig, out: Output, start: _Start, sched: Scheduler, shards: ShardSource
) -> tuple[set[int], dict[str, int]]:
    """Before the replicas stop: every part that appeared during the run is checked; one that is not
    this run's (a delayed write of another run), not a shard of the plan, or short, is removed under
    the fence and its shard run again (up to the shard's tries). Returns the good parts checked and
    their totals (a good part cannot change after: :func:`_finish` reads only the others)."""
    checked: set[int] = set()
    totals = {"images": 0, "ok": 0, "errors": 0}
    for _ in range(SHARD_TRIES):
        start.plan.reload()
        new = out.committed() - start.committed - checked
        good = set(new)
        found = verify_parts(out, start.plan, good, start.run_id, len(cfg.methods), cfg.topk, heal=True)
        checked |= good
        totals = {k: totals[k] + found[k] for k in totals}
        redo = sorted(s for s in new - good if s < start.plan.shards and s not in sched.failed_shards)
        if not redo:
            break
        for s in redo:
            shards.retry(s)
        sched.run()
    return checked, totals


def _finish(
    cfg: RunConfig,
    out: Output,
    start: _Start,
    sched: Scheduler | None,
    check: InputCheck | None,
    checked: tuple[set[int], dict[str, int]],
    t_start: float,
) -> Manifest:
    """What the output holds now, from the parts themselves (each checked against the plan and this
    run): the manifest, and ``_SUCCESS`` only if every shard of the plan is there and good."""
    plan = start.plan
    plan.reload()
    out.remove_temporaries()
    # The parts checked before the run, or before its replicas stopped (``checked``), cannot have
    # changed since: parts are created, never replaced, and only this run's holder deletes. Only the
    # others are read now (one footer read per part per run); one that is not this run's (or not the
    # plan's) is removed.
    good, seen = checked
    new = out.committed() - start.committed - good
    final = verify_parts(out, plan, new, start.run_id, len(cfg.methods), cfg.topk, heal=True)
    final = {k: final[k] + start.prior[k] + seen[k] for k in final}
    failed = sched.failed if sched else []
    present = start.committed | good | new
    complete = not failed and present >= set(range(plan.shards)) and final["images"] == plan.inputs
    t_ready = sched.t_ready if sched else time.time()
    elapsed = time.time() - t_start
    done = sched.counts if sched else {"shards_done": 0}
    manifest = Manifest(
        run_id=start.run_id,
        config={k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "verbose")},
        identity=cfg.identity(),
        versions=_versions(),
        counts={
            "images": plan.inputs,
            "ok": final["ok"],
            "errors": final["errors"],
            "shards": plan.shards,
            "shards_done": done["shards_done"],
            "shards_skipped": len(start.committed),
            "images_skipped": start.prior["images"],
            "shards_failed": len(failed),
        },
        input_check=check.summary() if check else None,
        failed_shards=failed,
        nodes=sched.nodes if sched else {},
        timings={
            "started": t_start,
            "elapsed_s": elapsed,
            "startup_s": t_ready - t_start,
            "attribution_s": ((sched.t_done or time.time()) - t_ready) if sched else 0.0,
            "images_per_s": sched.rate() if sched else 0.0,
        },
        driver_peak_rss_mb=peak_rss_mb(),
        actor_peak_rss_mb=sched.actor_rss if sched else 0.0,
    )
    out.write_manifest(manifest)  # the run's record (as every write: only while it holds the output)
    if complete:
        out.mark_complete(start.run_id)
    _summary(manifest, out, elapsed)
    return manifest


def _summary(m: Manifest, out: Output, elapsed: float) -> None:
    c, t = m.counts, m.timings
    log(
        f"{'done' if not m.failed_shards else 'FAILED'}: {plural(c['images'], 'image')} ({c['ok']} ok, "
        f"{plural(c['errors'], 'error')}); this run wrote {plural(c['shards_done'], 'shard')} at "
        f"{t['images_per_s']:.1f} img/s, {c['shards_skipped']} already committed, "
        f"{c['shards_failed']} failed; {elapsed:.1f} s in all (start-up {t['startup_s']:.1f} s) -> {out.uri}"
    )


def _report(out: Output, show_traceback: bool) -> None:
    """The report page, written under the run's lease (its fence guards the write). The heatmaps are
    written by now: a report failure is a warning, never the run's failure."""
    from lnstd.output import REPORT
    from lnstd.report import build_report

    try:
        out.write(out.path(REPORT), build_report(out.uri, opts=out.opts).encode())
        log(f"report -> {out.path(REPORT)}")
    except Exception as exc:
        log(f"warning: no report ({type(exc).__name__}: {one_line(exc)})")
        if show_traceback:
            traceback.print_exc()


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import timm
    import torch

    import lnstd

    return {
        "lnstd": lnstd.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
