"""The attribution job behind ``lnstd run``: a shard plan -> Ray actors -> one Parquet file per shard.

Why plain Ray actors rather than Ray Data: the unit of work, of commit and of resume is the shard.
Each shard is a fixed set of inputs from the plan (written once, before any shard starts), handed to
an actor that holds one model replica, decodes the shard's images on CPU threads (or its GPU) while
its model computes the previous batch, and commits ``heatmaps/part-NNNNN.parquet`` in one atomic
write. A rerun skips committed shards, so no row is ever written twice. Ray Data's
``write_parquet`` names and commits files per block on its own schedule, which leaves no stable unit
to resume from, and its CPU-decode / GPU-actor split pays off only when the GPU nodes lack CPUs:
one core decodes and preprocesses about 270 ImageNet-size JPEGs a second with PIL (410 through
torchvision's decoder; benchmarks/README.md, bench_decode), so the 16 cores of a one-GPU node feed
about 4,300 img/s, above the ~3,000 img/s an H100 explains ViT-B/16 at in bf16, and
``--decode gpu`` (nvjpeg on the actor's GPU) removes CPU decoding from nodes with fewer cores per
GPU. On 2 CPU cores the job's attribution phase runs at 0.95x a bare decode-and-explain loop
(bench_job). A lost actor (killed, its
node gone) is replaced and its shard retried (the commit is idempotent); actors that cannot be
placed yet (an autoscaling cluster) join as soon as a node for them appears. The driver streams the
plan and keeps only in-flight shards in memory, so its footprint does not grow with the dataset.

Order of a run: validate everything that can be checked without Ray (model, checkpoint, methods,
options, input, output, lease) -> list the input into a staged plan (first run) -> start Ray and the
actors -> claim the output's lease -> write the run identity and the plan -> shards -> manifest.
Nothing is written to the output before the first shard can start.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lnstd import output as layout
from lnstd import storage
from lnstd.config import RunConfig
from lnstd.data import Source, open_source
from lnstd.errors import (
    ConfigMismatchError,
    LeaseLostError,
    ModelError,
    OutputError,
    ResourceError,
    UsageError,
)
from lnstd.sysinfo import peak_rss_mb
from lnstd.weights import say_if_random

from .lease import Lease
from .plan import Plan

__all__ = ["run", "validate"]

SHARD_TRIES = 3  # attempts per shard: actor losses and shard-level faults together


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"lnstd: {msg}", file=sys.stderr)  # on a line of its own, never the progress bar's
    sys.stderr.flush()


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- before Ray: validation -------------------------------------------------------------------------
def validate(cfg: RunConfig, opts: storage.StorageOptions) -> Source:
    """Check everything that can be checked without Ray or writing: model, checkpoint, methods and
    options, credentials, input and output. Returns the opened input source.

    Raises:
        ModelError, UsageError, InputError, OutputError, StorageError: in one line, naming the flag.
    """
    from lnstd import Explainer
    from lnstd.models import check_model, check_pretrained

    if cfg.checkpoint_sha256 is None and cfg.checkpoint:
        raise ModelError(f"checkpoint not found: {cfg.checkpoint}")
    name, model = check_model(cfg.model, cfg.checkpoint, **cfg.model_args)
    if cfg.pretrained and not cfg.checkpoint and not str(cfg.model).startswith("hf:"):
        check_pretrained(name)  # cached or reachable, in seconds (the hub client retries a minute)
    if not cfg.methods:  # the default: every method that applies to this model
        from lnstd.arch import get_adapter
        from lnstd.methods import applicable_methods

        cfg.methods = applicable_methods(get_adapter(model))
    try:
        Explainer(model, cfg.methods, precision=cfg.precision, capture=cfg.capture, **cfg.options)
    except TypeError as exc:
        raise UsageError(f"--option: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if storage.is_s3(cfg.output) or storage.is_s3(cfg.input):
        storage.check_credentials()
    check_output(cfg.output, opts)
    source = open_source(cfg.input, opts)
    source.check()
    cfg.record_weights()
    return source


def check_output(output: str, opts: storage.StorageOptions) -> None:
    """The output can be created and written (checked without writing anything)."""
    if storage.is_s3(output):
        bucket = output[len("s3://") :].split("/", 1)[0]
        client = storage.s3_client(opts)
        try:
            client.head_bucket(Bucket=bucket)
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be used ({code})"
            raise OutputError(f"--output: bucket {bucket!r} {what}") from None
        return
    path = storage.resolve(output, opts)[1]
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--output {output} is a file; give a folder (it is created if missing)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"--output {output}: {probe} is a file, so the folder cannot be created")
    try:  # os.access says yes to root everywhere: try it (an empty folder, removed at once)
        os.rmdir(tempfile.mkdtemp(prefix=".lnstd-probe-", dir=probe))
    except OSError as exc:
        raise OutputError(f"--output {output}: cannot write in {probe} ({exc.strerror})") from None


def _previous(cfg: RunConfig, opts: storage.StorageOptions) -> dict[str, Any] | None:
    """The run recorded in the output (None: a fresh output). Raises on a different configuration."""
    try:
        previous = layout.read_state(cfg.output, layout.RUN, opts, {"run_id": str, "identity": dict})
    except OutputError:
        if not cfg.overwrite:
            raise
        previous = None  # --overwrite replaces a damaged record
    if previous is not None:
        ident = cfg.identity()
        if previous["identity"] != ident and not cfg.overwrite:
            diff = sorted(k for k in ident if previous["identity"].get(k) != ident[k])
            raise ConfigMismatchError(
                f"{cfg.output} holds a run with a different {', '.join(diff)}; "
                "pass --overwrite to replace it, or choose another --output"
            )
        return previous
    if not cfg.overwrite and storage.list_names(layout.uri(cfg.output, layout.HEATMAPS), opts):
        raise ConfigMismatchError(f"{cfg.output} holds heatmaps of an unknown run; pass --overwrite")
    return None


# --- Ray ------------------------------------------------------------------------------------------
def _ray_init(cfg: RunConfig) -> bool:
    """Start or join Ray; returns True for an existing cluster (which may autoscale)."""
    import logging

    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
        if k in os.environ
    }
    kwargs: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": cfg.verbose,  # worker output and tracebacks only when asked for
        "logging_level": logging.INFO if cfg.verbose else logging.ERROR,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if address:
        kwargs["address"] = address
    else:  # our own cluster, even if another one runs on this machine (Ray would join that one)
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
    # Ray puts the driver's working directory first on its workers' import path (and starts them
    # there). A folder in it named like this package (a checkout's parent, say) would shadow the
    # installed package, so Ray is started from the folder that holds the package actually
    # imported here, and the driver returns to where it was.
    import lnstd

    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(lnstd.__file__))))
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ResourceError(
            f"--address {address}: no Ray cluster answers there ({_last_line(exc)})"
        ) from None
    except Exception as exc:  # Ray's own start-up failures (a node that timed out, an overloaded GCS)
        where = f"--address {address}" if address else "this machine's Ray cluster"
        raise ResourceError(
            f"{where} could not start ({_last_line(exc)}); run the same command again, or -v for Ray's log"
        ) from None
    finally:
        os.chdir(here)
    return bool(address)


def _fits(cfg: RunConfig) -> tuple[int, str]:
    """How many actors the live nodes can hold now, and the largest node's resources in words."""
    import math

    import ray

    best, total = (0.0, 0.0), 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpu, gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        n = math.inf
        if cfg.cpus_per_actor > 0:
            n = min(n, math.floor(cpu / cfg.cpus_per_actor + 1e-9))
        if cfg.gpus_per_actor > 0:
            n = min(n, math.floor(gpu / cfg.gpus_per_actor + 1e-9))
        total += cfg.actors if n == math.inf else int(n)
        best = max(best, (cpu, gpu))
    return total, f"{best[0]:g} CPUs and {best[1]:g} GPUs"


class ActorPool:
    """The model replicas: actors waiting for a node, ready ones with their load, replacements.

    Ray's submit / next-ready shape: :meth:`submit` hands a shard number to the least loaded ready
    actor (two in flight each); the scheduler waits on :attr:`waiting` (in-flight calls and actors
    still starting) and passes what is ready to :meth:`admit` or :meth:`finished`.
    """

    def __init__(
        self, cfg: RunConfig, run_id: str, probe: str, fence: tuple[str, int], external: bool
    ) -> None:
        import ray

        from .worker import ShardWorker

        self.cfg, self.run_id, self.probe, self.fence = cfg, run_id, probe, fence
        self.remote = ray.remote(ShardWorker).options(
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0, max_task_retries=0
        )
        fit, largest = _fits(cfg)
        want = cfg.actors
        if fit == 0 and not external:
            raise ResourceError(
                f"an actor needs {cfg.cpus_per_actor:g} CPUs and {cfg.gpus_per_actor:g} GPUs, but this "
                f"machine has {largest}: lower --cpus-per-actor / --gpus-per-actor"
            )
        if fit < want and not external:
            _log(f"only {fit} of {want} actors fit on this machine ({largest}); starting {fit}")
            want = fit
        self.ready: list[Any] = []
        self.starting: dict[Any, Any] = {}  # info ref -> actor
        self.load: dict[Any, int] = {}
        self.calls: dict[Any, tuple[int, Any]] = {}  # process ref -> (shard, actor)
        self.start_losses = 0
        for _ in range(want):
            self.spawn()

    @property
    def waiting(self) -> list[Any]:
        """Every reference a result may come from: shard calls, then actors starting."""
        return [*self.calls, *self.starting]

    def spawn(self) -> None:
        actor = self.remote.remote(self.cfg.to_dict(), self.run_id, self.fence)
        self.starting[actor.info.remote(self.probe)] = actor

    def wait_first(self, timeout: float) -> None:
        """Block until one actor is ready; clear errors if none can start."""
        import ray

        deadline = time.time() + timeout
        warned = False
        while not self.ready:
            if not self.starting:
                raise ResourceError("no actor could be started")
            done, _ = ray.wait(list(self.starting), num_returns=1, timeout=5.0)
            if done:
                self.admit(done[0])
                continue
            if not warned and _fits(self.cfg)[0] == 0:
                warned = True
                need = f"{self.cfg.cpus_per_actor:g} CPUs and {self.cfg.gpus_per_actor:g} GPUs"
                _log(f"waiting for a node with {need} for an actor (up to {timeout:.0f} s)")
            if time.time() > deadline:
                raise ResourceError(
                    f"no node could take an actor ({self.cfg.cpus_per_actor:g} CPUs, "
                    f"{self.cfg.gpus_per_actor:g} GPUs) within {timeout:.0f} s; the largest node has "
                    f"{_fits(self.cfg)[1]}"
                )

    def admit(self, ref: Any) -> None:
        """An actor's ``info`` call returned: it is ready, or it failed to start, or its node
        cannot see the run's storage (then the run stops: its commits would be lost)."""
        import ray

        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            msg = _last_line(exc)
            if "creation task" in str(exc):  # its __init__ raised: the same error would repeat
                if not self.ready:
                    raise ModelError(f"the model replica could not start: {msg}") from None
                _log(f"an actor could not start ({msg}); going on with {len(self.ready)}")
                return
            self.start_losses += 1
            if self.start_losses > 3 * max(1, self.cfg.actors):
                raise ResourceError(
                    f"actors keep dying while they start ({msg}); rerun with --verbose to see why"
                ) from None
            _log(f"an actor was lost while starting ({msg}); starting another")
            self.spawn()
            return
        if info.get("cannot_see"):
            ray.kill(actor)
            raise OutputError(
                f"the actor on node {info['node_ip'] or info['node_id'][:12]} cannot read "
                f"{info['cannot_see']}: every node must see the input and the output; a multi-node "
                "run needs s3:// (or a file system shared by every node) for --input and --output"
            )
        self.ready.append(actor)
        self.load[actor] = 0
        _log(f"actor {len(self.ready) - 1} ready (pid {info['pid']}, {info['device']})")

    def submit(self, shard: int) -> bool:
        """Start ``shard`` on the least loaded ready actor with room; False if none has room."""
        free = [a for a in self.ready if self.load[a] < 2]
        if not free:
            return False
        actor = min(free, key=self.load.__getitem__)
        self.load[actor] += 1
        self.calls[actor.process.remote(shard)] = (shard, actor)
        return True

    def finished(self, ref: Any) -> tuple[int, Any]:
        """Forget a returned shard call: (shard, actor)."""
        shard, actor = self.calls.pop(ref)
        if actor in self.load:
            self.load[actor] -= 1
        return shard, actor

    def lost(self, actor: Any) -> None:
        """Forget a dead actor and start a replacement (placed wherever the cluster has room)."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.load.pop(actor, None)
            self.spawn()

    def stop(self) -> None:
        """Kill every actor now (in-flight shards are abandoned, never committed half)."""
        import ray

        for actor in [*self.ready, *self.starting.values()]:
            with contextlib.suppress(Exception):
                ray.kill(actor)


_CLOSED = -1  # the input check's sentinel: no more shards will come from it


class ShardSource:
    """The shard numbers left to attribute, in order: retries first, then the plan's uncommitted
    shards (counted, never listed), then shards appended by ``--refresh-input`` (a queue that the
    input check closes with a sentinel). Exhausted only once that sentinel has arrived, so a shard
    queued at the moment the scheduler drains is still run."""

    def __init__(self, shards: int, committed: set[int], refresh: queue.Queue[int] | None) -> None:
        self._next = 0
        self._end = shards
        self._committed = committed
        self._retries: collections.deque[int] = collections.deque()
        self._refresh = refresh
        self._open = refresh is not None

    def retry(self, shard: int) -> None:
        self._retries.append(shard)

    def take(self) -> int | None:
        """The next shard to start, or None if none is available now."""
        if self._retries:
            return self._retries.popleft()
        while self._next < self._end:
            shard, self._next = self._next, self._next + 1
            if shard not in self._committed:
                return shard
        while self._open:
            try:
                shard = self._refresh.get_nowait()  # type: ignore[union-attr]
            except queue.Empty:
                return None
            if shard == _CLOSED:
                self._open = False
            else:
                return shard
        return None

    @property
    def exhausted(self) -> bool:
        """Nothing is left and nothing more can come."""
        return not self._retries and self._next >= self._end and not self._open


class Scheduler:
    """One loop: start shards on free actors, collect results, retry failures, count progress."""

    def __init__(
        self, cfg: RunConfig, pool: ActorPool, source: ShardSource, lease: Lease, sizes: Plan, progress: bool
    ) -> None:
        from tqdm import tqdm

        self.cfg, self.pool, self.source, self.lease, self.plan = cfg, pool, source, lease, sizes
        self.tries: dict[int, int] = {}  # failures so far, per shard that failed at least once
        self.counts = {"shards_done": 0, "ok": 0, "errors": 0, "images": 0}
        self.failed: list[dict[str, Any]] = []
        self.nodes: dict[str, int] = {}
        self.actor_rss = 0.0
        self.t_ready = time.time()
        self.t_done: float | None = None
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=sizes.inputs, unit="img", disable=not progress, mininterval=1.0,
                        file=sys.stderr, dynamic_ncols=True, bar_format=fmt)  # fmt: skip

    def rate(self) -> float:
        """Images per second of the attribution phase (so far, or in all once it is over)."""
        end = self.t_done if self.t_done is not None else time.time()
        return self.counts["images"] / max(end - self.t_ready, 1e-9)

    def run(self, skipped_images: int) -> None:
        import ray

        self.bar.update(skipped_images)
        idle_since: float | None = None
        while True:
            if self.lease.lost.is_set():
                raise LeaseLostError(
                    f"{self.cfg.output}: this run lost the output's lease to another run; stopped"
                )
            while (shard := self.source.take()) is not None:
                if not self.pool.submit(shard):
                    self.source.retry(shard)  # no free actor: first in line next time
                    break
            if not self.pool.calls and self.source.exhausted:
                break
            if not self.pool.waiting:
                if not self.pool.ready:
                    self.pool.spawn()  # every actor was lost and none is starting: start one
                else:
                    time.sleep(0.2)  # only the input check can bring more
                continue
            if self.pool.ready:
                idle_since = None
            elif idle_since is None:
                idle_since = time.time()
            elif time.time() - idle_since > self.cfg.startup_timeout:
                raise ResourceError(
                    f"no actor has been running for {self.cfg.startup_timeout:.0f} s: "
                    "the cluster lost its nodes"
                )
            ready, _ = ray.wait(self.pool.waiting, num_returns=1, timeout=1.0)
            if ready:
                self._collect(ready[0])
        self.t_done = time.time()  # the attribution phase ends here: the bar and the summary agree
        self.bar.set_postfix_str(f"{self.rate():.1f} img/s", refresh=False)
        self.bar.close()

    def _collect(self, ref: Any) -> None:
        import ray

        if ref in self.pool.starting:
            self.pool.admit(ref)
            return
        shard, actor = self.pool.finished(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            _log(f"actor lost on shard {shard} ({type(exc).__name__}); replacing it")
            self.pool.lost(actor)
            self._retry(shard, _last_line(exc))
            return
        except ray.exceptions.RayTaskError as exc:
            self._retry(shard, _last_line(exc))
            return
        self.counts["shards_done"] += 1
        for k in ("ok", "errors", "images"):
            self.counts[k] += res[k]
        self.actor_rss = max(self.actor_rss, float(res.get("peak_rss_mb", 0.0)))
        node = res.get("node_id") or "?"
        self.nodes[node] = self.nodes.get(node, 0) + 1
        self.bar.set_postfix_str(f"{self.rate():.1f} img/s", refresh=False)
        self.bar.update(res["images"])

    def _retry(self, shard: int, why: str) -> None:
        tries = self.tries.get(shard, 0) + 1
        self.tries[shard] = tries
        if tries < SHARD_TRIES:
            _log(f"shard {shard} failed ({why}); retrying")
            self.source.retry(shard)
        else:
            self.failed.append({"shard": shard, "error": why})
            _log(f"shard {shard} failed {SHARD_TRIES} times: {why}")


# --- the run -------------------------------------------------------------------------------------
def run(
    cfg: RunConfig, progress: bool = True, finish: Callable[[dict[str, Any], Lease], None] | None = None
) -> dict[str, Any]:
    """Run the job to completion (or resume it); returns the manifest written into the output.

    Order: validate (no writes) -> claim the output's lease (a second run stops here, in seconds)
    -> check the recorded run -> commit the plan (first run) -> start Ray and the actors -> shards
    -> manifest -> ``finish(manifest, lease)`` (the CLI writes the report there, under the lease's
    fence). A run that fails before its first shard on a fresh output leaves nothing behind; a rerun
    of a finished output changes nothing in it (``finish`` is not called).

    Raises:
        LnstdError subclasses for everything a user can act on (bad flags, model, input, output,
        a held lease, a different run in the output, resources the cluster lacks).
    """
    t_start = time.time()
    opts = storage.StorageOptions.from_env(cfg.s3_endpoint)
    source = validate(cfg, opts)
    fresh = not _has_anything(cfg.output, opts)
    lease = Lease(cfg.output, opts, ttl=cfg.lease_ttl)
    lease.acquire()
    keep = True
    try:
        previous = _previous(cfg, opts)
        run_id = previous["run_id"] if previous and not cfg.overwrite else uuid.uuid4().hex[:12]
        lease.me.run_id = run_id
        plan, resumed = _prepare(cfg, opts, run_id, source, lease)
        committed = _committed(cfg, opts)
        prior = _verify_parts(cfg, opts, plan, committed, run_id, heal=lease)
        if not cfg.refresh_input and committed >= set(range(plan.shards)):
            done = _finished_before(cfg, opts, plan, committed, t_start)
            if done is not None:
                return done
        if committed:
            _log(f"resuming: {len(committed)} of {plan.shards} shards already committed")
        say_if_random(cfg.weights)  # once, after the refusals (each one line), before Ray starts
        manifest = _attribute(
            cfg, opts, run_id, plan, source, lease, committed, prior, resumed, t_start, progress
        )
        if finish is not None:  # e.g. the report: written while this run still holds the output
            finish(manifest, lease)
        return manifest
    except BaseException:
        # A fresh output whose run failed before its first shard committed (a flag, the model, the
        # cluster's resources): nothing of it is worth keeping, so nothing is left behind.
        with contextlib.suppress(Exception):
            keep = not fresh or bool(_committed(cfg, opts))
        if not keep:
            lease.release()
            with contextlib.suppress(Exception):
                storage.delete_tree(layout.uri(cfg.output, "_lnstd"), opts)
            _remove_if_empty(cfg.output, opts)
        raise
    finally:
        if keep:
            lease.release()


def _has_anything(output: str, opts: storage.StorageOptions) -> bool:
    if storage.is_s3(output):
        return bool(storage.list_names(output, opts))
    path = storage.resolve(output, opts)[1]
    return os.path.isdir(path) and bool(os.listdir(path))


def _remove_if_empty(output: str, opts: storage.StorageOptions) -> None:
    if storage.is_s3(output):
        return
    path = storage.resolve(output, opts)[1]
    for folder in (os.path.join(path, "_lnstd"), path):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _prepare(
    cfg: RunConfig, opts: storage.StorageOptions, run_id: str, source: Source, lease: Lease
) -> tuple[Plan, bool]:
    """Under the lease: clear an overwritten output, commit the plan (listing the input once) or
    read the committed one, record the run. Returns (plan, whether it was committed before)."""
    if cfg.overwrite:
        with lease.fenced():  # only the holder of the output deletes what is in it
            for sub in (layout.HEATMAPS, layout.AGGREGATE, layout.PLAN):
                storage.delete_tree(layout.uri(cfg.output, sub), opts)
            for name in (layout.MANIFEST, layout.SUCCESS, layout.REPORT, layout.RUN):
                storage.delete_file(layout.uri(cfg.output, name), opts)
    plan = Plan.load(cfg.output, opts)
    if plan is not None and (plan.meta["input"] != cfg.input or plan.meta["shard_size"] != cfg.shard_size):
        if storage.exists(layout.uri(cfg.output, layout.RUN), opts):
            raise ConfigMismatchError(f"{cfg.output}: its shard plan is for another --input or --shard-size")
        plan = None  # a plan no run ever used: list again
    resumed = plan is not None
    if plan is not None:
        plan.clean()
    else:  # list once, into the output (ids checked here), before any actor waits for work
        plan = Plan.create(cfg.output, source, cfg.shard_size, opts, dedupe=cfg.dedupe)
        skipped = source.notice()
        _log(f"plan: {plan.inputs} inputs in {plan.shards} shards of up to {cfg.shard_size}"
             + (f"; {skipped}" if skipped else ""))  # fmt: skip
    storage.write_bytes(
        layout.uri(cfg.output, layout.RUN),
        json.dumps({"run_id": run_id, "identity": cfg.identity()}, indent=1).encode(),
        opts,
    )
    for folder in ("", layout.HEATMAPS):  # temporaries of writers killed in an earlier run
        storage.remove_temporaries(layout.uri(cfg.output, folder) if folder else cfg.output, opts)
    return plan, resumed


def _committed(cfg: RunConfig, opts: storage.StorageOptions) -> set[int]:
    names = storage.list_names(layout.uri(cfg.output, layout.HEATMAPS), opts)
    return {s for s in (layout.shard_of(n) for n in names) if s is not None}


def _verify_parts(
    cfg: RunConfig,
    opts: storage.StorageOptions,
    plan: Plan,
    committed: set[int],
    run_id: str,
    heal: Lease | None,
) -> dict[str, int]:
    """Check every committed part this run relies on against the plan: its footer is readable,
    it was written by this run, and it holds its shard's inputs and the rows they make. With
    ``heal`` (the run's lease), parts that fail are removed under it (their shards run again) and
    dropped from ``committed``; without, they are only dropped. Returns the totals of the good
    parts (from their footers)."""
    methods = len(cfg.methods)
    totals = {"images": 0, "ok": 0, "errors": 0}
    bad = []
    for s in sorted(committed):
        f = layout.part_footer(cfg.output, s, opts)
        want = plan.shard_inputs(s)
        good = (
            f is not None
            and f.run_id == run_id
            and (want is None or f.counts.get("images") == want)
            and _rows_match(f, methods, cfg.topk)
        )
        if not good:
            bad.append(s)
            continue
        for k in totals:
            totals[k] += int(f.counts.get(k, 0))
    for s in bad:
        committed.discard(s)
    if bad and heal is not None:
        with heal.fenced():
            storage.delete_file(layout.uri(cfg.output, layout.SUCCESS), opts)  # not complete any more
            for s in bad:
                storage.delete_file(layout.part_uri(cfg.output, s), opts)
    if bad and heal:
        shown = ", ".join(str(s) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
        _log(f"{len(bad)} committed part(s) unreadable, short or of another run: rewriting shard(s) {shown}")
    return totals


def _rows_match(f: layout.Footer, methods: int, topk: int | None) -> bool:
    """A part's rows: one per method for an error image, one per method and target for the others
    (top-k: k targets, or fewer when the model has fewer classes)."""
    ok, errors = f.counts.get("ok", -1), f.counts.get("errors", -1)
    if ok < 0 or errors < 0:
        return False
    rest = f.rows - methods * errors
    if not topk or ok == 0:
        return rest == methods * ok
    return rest > 0 and rest % (methods * ok) == 0 and rest // (methods * ok) <= topk


def _finished_before(
    cfg: RunConfig, opts: storage.StorageOptions, plan: Plan, committed: set[int], t_start: float
) -> dict[str, Any] | None:
    """A rerun of a finished job: its manifest and report stay the real run's; returns the manifest
    (None if the earlier run died before it wrote one: then this run writes it)."""
    uri = layout.uri(cfg.output, layout.MANIFEST)
    if not (storage.exists(layout.uri(cfg.output, layout.SUCCESS), opts) and storage.exists(uri, opts)):
        return None
    try:
        manifest = layout.read_state(cfg.output, layout.MANIFEST, opts, {"counts": dict})
    except OutputError:
        return None  # a damaged record: this run writes it again
    if manifest is None:
        return None
    c = manifest["counts"]
    _log(
        f"done already: {c['images']} images ({c['ok']} ok, {c['errors']} errors) in "
        f"{c['shards']} shards -> {cfg.output}; nothing to do ({time.time() - t_start:.1f} s)"
    )
    return {**manifest, "noop": True}


def _attribute(
    cfg: RunConfig,
    opts: storage.StorageOptions,
    run_id: str,
    plan: Plan,
    source: Source,
    lease: Lease,
    committed: set[int],
    prior: dict[str, int],
    resumed: bool,
    t_start: float,
    progress: bool,
) -> dict[str, Any]:
    """Start Ray and the actors, run the uncommitted shards, write the manifest."""
    refresh: queue.Queue[int] | None = queue.Queue() if resumed else None
    check = _InputCheck(plan, source, cfg.refresh_input, refresh, lease) if refresh is not None else None
    shards = ShardSource(plan.shards, committed, refresh)
    pool: ActorPool | None = None
    sched: Scheduler | None = None
    probe = layout.uri(cfg.output, "_lnstd", f"probe-{lease.me.token}")
    storage.write_bytes(probe, run_id.encode(), opts)
    try:
        if not shards.exhausted or check is not None:
            external = _ray_init(cfg)
            pool = ActorPool(cfg, run_id, probe, (lease.token, lease.generation), external)
            pool.wait_first(cfg.startup_timeout)
        if check is not None:
            check.start()
        if pool is not None:
            sched = Scheduler(cfg, pool, shards, lease, plan, progress)
            sched.run(prior["images"])
    except BaseException:
        if pool is not None:
            pool.stop()  # no actor of this run starts or commits another shard after it ends
        raise
    finally:
        with contextlib.suppress(Exception):
            storage.delete_file(probe, opts)
    if check is not None:
        check.join()
        if check.error:
            _log(f"warning: the input check failed ({check.error}); the plan was finished as recorded")
    plan.reload()
    storage.remove_temporaries(layout.uri(cfg.output, layout.HEATMAPS), opts)
    done = sched.counts if sched else {"shards_done": 0, "ok": 0, "errors": 0, "images": 0}
    failed = sched.failed if sched else []
    t_ready = sched.t_ready if sched else time.time()
    attribution_s = (sched.t_done or time.time()) - t_ready if sched else 0.0
    images_per_s = sched.rate() if sched else 0.0
    images = plan.inputs
    # What the output holds now, from the parts themselves (each checked against the plan and this
    # run): _SUCCESS only if every shard of the plan is there and good.
    # The parts checked before the run (``committed``, ``prior``) cannot have changed since: parts are
    # created, never replaced, and only this run's holder deletes. Only the others are read now.
    new = _committed(cfg, opts) - committed
    final = _verify_parts(cfg, opts, plan, new, run_id, heal=None)
    final = {k: final[k] + prior[k] for k in final}
    present = committed | new
    complete = not failed and present >= set(range(plan.shards)) and final["images"] == images
    ok, errors = final["ok"], final["errors"]
    elapsed = time.time() - t_start
    manifest = {
        "run_id": run_id,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "verbose")},
        "identity": cfg.identity(),
        "versions": _versions(),
        "counts": {
            "images": images,
            "ok": ok,
            "errors": errors,
            "shards": plan.shards,
            "shards_done": done["shards_done"],
            "shards_skipped": len(committed),
            "images_skipped": prior["images"],
            "shards_failed": len(failed),
        },
        "input_check": check.summary() if check else None,
        "failed_shards": failed,
        "nodes": sched.nodes if sched else {},
        "timings": {
            "started": t_start,
            "elapsed_s": elapsed,
            "startup_s": t_ready - t_start,
            "attribution_s": attribution_s,
            "images_per_s": images_per_s,
        },
        "driver_peak_rss_mb": peak_rss_mb(),
        "actor_peak_rss_mb": sched.actor_rss if sched else 0.0,
    }
    with lease.fenced():  # the run's record, only while this run holds the output
        storage.write_bytes(
            layout.uri(cfg.output, layout.MANIFEST), json.dumps(manifest, indent=1).encode(), opts
        )
        if complete:
            storage.write_bytes(layout.uri(cfg.output, layout.SUCCESS), b"", opts)
    _log(
        f"{'done' if not failed else 'FAILED'}: {images} images ({ok} ok, {errors} errors); this run wrote "
        f"{done['shards_done']} shards at {images_per_s:.1f} img/s, "
        f"{len(committed)} shards were already committed, {len(failed)} failed; "
        f"{elapsed:.1f} s in all (start-up {t_ready - t_start:.1f} s) -> {cfg.output}"
    )
    return manifest


class _InputCheck(threading.Thread):
    """On a resume: list the input again and compare it with the plan, while the shards run.

    With ``refresh`` the added inputs become new shards (appended to the plan, then their numbers
    queued). The queue is closed with a sentinel whatever happens, so the scheduler never waits for
    a check that is over, nor finishes before it is."""

    def __init__(
        self, plan: Plan, source: Source, refresh: bool, out: queue.Queue[int], lease: Lease
    ) -> None:
        super().__init__(name="lnstd-input-check", daemon=True)
        self.plan, self.source, self.refresh, self.out, self.lease = plan, source, refresh, out, lease
        self.diff = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.diff = self.plan.diff(self.source, keep_added=self.refresh)
            notice = self.diff.notice(self.refresh)
            if notice:
                _log(notice)
            if self.refresh and self.diff.added_items:
                # The output stops being complete before the plan grows: a run killed from here on
                # leaves no _SUCCESS (nor a manifest) that claims the old plan's totals.
                with self.lease.fenced():
                    for name in (layout.SUCCESS, layout.MANIFEST):
                        storage.delete_file(layout.uri(self.plan.output, name), self.plan.opts)
                new = self.plan.extend(self.diff.added_items)
                self.diff.added_items = []
                for shard in new:
                    self.out.put(shard)
                _log(f"plan: {len(new)} new shards ({new[0]}..{new[-1]})")
        except Exception as exc:  # the plan is finished as recorded either way
            self.error = _last_line(exc)
        finally:
            self.out.put(_CLOSED)

    def summary(self) -> dict[str, Any] | None:
        if self.diff is None:
            return {"error": self.error} if self.error else None
        return {"added": self.diff.added, "removed": self.diff.removed, "refreshed": self.refresh}


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
