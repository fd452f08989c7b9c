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

import contextlib
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from lnstd import output as layout
from lnstd import storage
from lnstd.data import Item, Source, open_source
from lnstd.errors import ConfigMismatchError, ModelError, OutputError, ResourceError, UsageError
from lnstd.sysinfo import peak_rss_mb

from .config import RunConfig
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
    from lnstd.models import check_model

    if cfg.checkpoint_sha256 is None and cfg.checkpoint:
        raise ModelError(f"checkpoint not found: {cfg.checkpoint}")
    _, model = check_model(cfg.model, cfg.checkpoint, **cfg.model_args)
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
    run_uri = layout.uri(cfg.output, layout.RUN)
    if storage.exists(run_uri, opts):
        previous = json.loads(storage.read_bytes(run_uri, opts))
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


class _NoActors:
    """The pool of a run with nothing left to attribute (every shard of its plan is committed)."""

    def __init__(self) -> None:
        self.ready: list[Any] = []
        self.pending: dict[Any, Any] = {}
        self.load: dict[Any, int] = {}

    def pick(self) -> None:
        return None

    def spawn(self) -> None:
        raise RuntimeError("a finished run has no actors")


class _Actors:
    """The actor pool: ready actors, actors waiting for a node, replacement of lost ones."""

    def __init__(self, cfg: RunConfig, run_id: str, external: bool) -> None:
        import ray

        from .worker import ShardWorker

        self.cfg, self.run_id = cfg, run_id
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
        self.pending: dict[Any, Any] = {}  # info ref -> actor
        self._actor_of: dict[Any, Any] = {}
        self.start_losses = 0
        self.load: dict[Any, int] = {}
        for _ in range(want):
            self.spawn()

    def spawn(self) -> None:
        actor = self.remote.remote(self.cfg.to_dict(), self.run_id)
        ref = actor.info.remote()
        self.pending[ref] = actor
        self._actor_of[ref] = actor

    def wait_first(self, timeout: float, external: bool) -> None:
        """Block until one actor is ready; clear errors if none can start."""
        import ray

        deadline = time.time() + timeout
        warned = False
        while not self.ready:
            if not self.pending:
                raise ResourceError("no actor could be started")
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=5.0)
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
        """An actor's ``info`` call returned: it is ready, or it failed to start."""
        import ray

        self.pending.pop(ref)
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
        actor = self._actor_of.pop(ref)
        self.ready.append(actor)
        self.load[actor] = 0
        _log(f"actor {len(self.ready) - 1} ready (pid {info['pid']}, {info['device']})")

    def pick(self) -> Any | None:
        """The least loaded ready actor with room for another shard (two in flight each)."""
        free = [a for a in self.ready if self.load[a] < 2]
        return min(free, key=self.load.__getitem__) if free else None

    def lost(self, actor: Any) -> None:
        """Forget a dead actor and start a replacement (placed wherever the cluster has room)."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.load.pop(actor, None)
            self.spawn()


# --- the run -------------------------------------------------------------------------------------
def run(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job to completion (or resume it); returns the manifest written into the output.

    Raises:
        LnstdError subclasses for everything a user can act on (bad flags, model, input, output,
        a held lease, a different run in the output, resources the cluster lacks).
    """
    t_start = time.time()
    opts = storage.StorageOptions.from_env(cfg.s3_endpoint)
    source = validate(cfg, opts)
    lease = Lease(cfg.output, opts, ttl=cfg.lease_ttl)
    lease.check()
    previous = _previous(cfg, opts)
    run_id = previous["run_id"] if previous and not cfg.overwrite else uuid.uuid4().hex[:12]
    lease.me.run_id = run_id
    plan = None if cfg.overwrite else Plan.load(cfg.output, opts)
    if plan is not None and (plan.meta["input"] != cfg.input or plan.meta["shard_size"] != cfg.shard_size):
        if previous is not None:
            raise ConfigMismatchError(f"{cfg.output}: its shard plan is for another --input or --shard-size")
        plan = None  # a plan no run ever used: list again
    staging = None
    if plan is None:  # list once, before any actor waits for work (ids checked here)
        staging = tempfile.mkdtemp(prefix="lnstd-plan-")
        staged = Plan.create(staging, source, cfg.shard_size, storage.StorageOptions(), dedupe=cfg.dedupe)
        _log(f"plan: {staged.inputs} inputs in {staged.shards} shards of up to {cfg.shard_size}")
    finished = plan is not None and not cfg.refresh_input and _committed(cfg, opts) >= set(range(plan.shards))
    try:
        if finished:  # every shard is committed: no actor is needed to check and record that
            actors: _Actors | _NoActors = _NoActors()
        else:
            external = _ray_init(cfg)
            actors = _Actors(cfg, run_id, external)
            actors.wait_first(cfg.startup_timeout, external)
        lease.acquire()
        try:
            # The checks above only fail fast; under the lease they are made again, for real: a
            # run that finished between our check and our claim may have recorded its own
            # configuration and plan.
            previous = _previous(cfg, opts)
            run_id = previous["run_id"] if previous and not cfg.overwrite else run_id
            publish = staging
            committed_plan = None if cfg.overwrite else Plan.load(cfg.output, opts)
            if committed_plan is not None and publish is not None:
                plan, publish = committed_plan, None  # use the plan another run committed
            plan = _prepare(cfg, opts, run_id, plan, publish)
            return _schedule(
                cfg, opts, run_id, plan, source, actors, lease, t_start, progress, resumed=publish is None
            )
        finally:
            lease.release()
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _prepare(
    cfg: RunConfig, opts: storage.StorageOptions, run_id: str, plan: Plan | None, staging: str | None
) -> Plan:
    """Under the lease: clear an overwritten output, record the run, commit the plan."""
    if cfg.overwrite:
        for sub in (layout.HEATMAPS, layout.AGGREGATE, layout.PLAN):
            storage.delete_tree(layout.uri(cfg.output, sub), opts)
        for name in (layout.MANIFEST, layout.SUCCESS, layout.REPORT, layout.RUN):
            storage.delete_file(layout.uri(cfg.output, name), opts)
    storage.write_bytes(
        layout.uri(cfg.output, layout.RUN),
        json.dumps({"run_id": run_id, "identity": cfg.identity()}, indent=1).encode(),
        opts,
    )
    if staging is not None:  # publish the staged plan: its parts, then plan.json (the commit)
        local = os.path.join(staging, layout.PLAN)
        for name in sorted(os.listdir(local), key=lambda n: n == "plan.json"):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(layout.uri(cfg.output, layout.PLAN, name), f.read(), opts)
        plan = Plan.load(cfg.output, opts)
    assert plan is not None
    for folder in ("", layout.HEATMAPS):  # temporaries of writers killed in an earlier run
        storage.remove_temporaries(layout.uri(cfg.output, folder) if folder else cfg.output, opts)
    return plan


def _committed(cfg: RunConfig, opts: storage.StorageOptions) -> set[int]:
    names = storage.list_names(layout.uri(cfg.output, layout.HEATMAPS), opts)
    return {s for s in (layout.shard_of(n) for n in names) if s is not None}


def _schedule(
    cfg: RunConfig,
    opts: storage.StorageOptions,
    run_id: str,
    plan: Plan,
    source: Source,
    actors: _Actors | _NoActors,
    lease: Lease,
    t_start: float,
    progress: bool,
    resumed: bool,
) -> dict[str, Any]:
    import ray
    from tqdm import tqdm

    committed = _committed(cfg, opts)
    # What the committed shards hold, from their footers (the plan is read once, by iter_shards).
    prior = {"images": 0, "ok": 0, "errors": 0}
    for s in committed:
        c = layout.shard_counts(cfg.output, s, opts)
        for k in prior:
            prior[k] += c.get(k, 0)
    extra: queue.Queue[tuple[int, list[Item]]] = queue.Queue()
    check = _InputCheck(plan, source, cfg.refresh_input, extra) if resumed else None
    if check:
        check.start()
    shards: Iterator[tuple[int, list[Item]]] = plan.iter_shards(skip=committed)
    t_ready = time.time()
    done_images = 0
    counts = {"shards_done": 0, "ok": 0, "errors": 0}
    failed: list[dict[str, Any]] = []
    nodes: dict[str, int] = {}
    in_flight: dict[Any, tuple[int, list[Item], Any, int]] = {}  # ref -> shard, items, actor, tries
    backlog: list[tuple[int, list[Item], int]] = []  # shards waiting for a free actor

    def rate() -> float:
        return done_images / max(time.time() - t_ready, 1e-9)

    total = plan.inputs
    bar = tqdm(total=total, initial=prior["images"], unit="img",
               disable=not progress, mininterval=1.0, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")  # fmt: skip
    bar.set_postfix_str(f"{rate():.1f} img/s", refresh=False)

    state = {"exhausted": committed >= set(range(plan.shards))}

    def next_shard() -> tuple[int, list[Item], int] | None:
        if backlog:
            return backlog.pop(0)
        with contextlib.suppress(queue.Empty):
            s, items = extra.get_nowait()
            return s, items, 0
        nxt = next(shards, None)
        if nxt is None:
            state["exhausted"] = True
            return None
        return nxt[0], nxt[1], 0

    def fill() -> None:
        while True:
            actor = actors.pick()
            if actor is None:
                return
            job = next_shard()
            if job is None:
                return
            shard, items, tries = job
            actors.load[actor] += 1
            in_flight[actor.process.remote(shard, items)] = (shard, items, actor, tries)

    def retry(shard: int, items: list[Item], tries: int, why: str) -> None:
        if tries + 1 < SHARD_TRIES:
            backlog.append((shard, items, tries + 1))
        else:
            failed.append({"shard": shard, "error": why})
            _log(f"shard {shard} failed {SHARD_TRIES} times: {why}")

    idle_since: float | None = None
    actor_rss = 0.0
    while True:
        if lease.lost.is_set():
            raise OutputError(f"{cfg.output}: this run lost the output's lease to another run; stopped")
        fill()
        idle = not in_flight and not backlog and extra.empty() and state["exhausted"]
        if idle and (check is None or not check.is_alive()):
            break
        waiting = list(in_flight) + list(actors.pending)
        if not waiting:
            if not actors.ready and isinstance(actors, _Actors):
                actors.spawn()  # every actor was lost and none is starting: start one
            else:
                time.sleep(0.2)  # only the input check is still running
            continue
        if actors.ready:
            idle_since = None
        elif idle_since is None:
            idle_since = time.time()
        elif time.time() - idle_since > cfg.startup_timeout:
            raise ResourceError(
                f"no actor has been running for {cfg.startup_timeout:.0f} s: the cluster lost its nodes"
            )
        ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
        if not ready:
            continue
        ref = ready[0]
        if ref in actors.pending:
            actors.admit(ref)
            continue
        shard, items, actor, tries = in_flight.pop(ref)
        if actor in actors.load:
            actors.load[actor] -= 1
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            _log(f"actor lost on shard {shard} ({type(exc).__name__}); replacing it")
            actors.lost(actor)
            retry(shard, items, tries, _last_line(exc))
            continue
        except ray.exceptions.RayTaskError as exc:
            msg = _last_line(exc)
            _log(f"shard {shard} failed ({msg}); {'retrying' if tries + 1 < SHARD_TRIES else 'giving up'}")
            retry(shard, items, tries, msg)
            continue
        counts["shards_done"] += 1
        counts["ok"] += res["ok"]
        counts["errors"] += res["errors"]
        actor_rss = max(actor_rss, float(res.get("peak_rss_mb", 0.0)))
        node = res.get("node_id") or "?"
        nodes[node] = nodes.get(node, 0) + 1
        done_images += len(items)
        bar.set_postfix_str(f"{rate():.1f} img/s", refresh=False)
        bar.update(len(items))
    attribution_s = time.time() - t_ready
    images_per_s = done_images / attribution_s if attribution_s > 0 else 0.0
    bar.set_postfix_str(f"{images_per_s:.1f} img/s", refresh=False)  # the summary's figure
    bar.close()
    if check is not None:
        check.join()
        if check.error:
            _log(f"warning: the input check failed ({check.error}); the plan was finished as recorded")
    storage.remove_temporaries(layout.uri(cfg.output, layout.HEATMAPS), opts)
    images = plan.inputs
    ok, errors = prior["ok"] + counts["ok"], prior["errors"] + counts["errors"]
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
            "shards_done": counts["shards_done"],
            "shards_skipped": len(committed),
            "images_skipped": prior["images"],
            "shards_failed": len(failed),
        },
        "input_check": check.summary() if check else None,
        "failed_shards": failed,
        "nodes": nodes,
        "timings": {
            "started": t_start,
            "elapsed_s": elapsed,
            "startup_s": t_ready - t_start,
            "attribution_s": attribution_s,
            "images_per_s": images_per_s,
        },
        "driver_peak_rss_mb": peak_rss_mb(),
        "actor_peak_rss_mb": actor_rss,
    }
    storage.write_bytes(
        layout.uri(cfg.output, layout.MANIFEST), json.dumps(manifest, indent=1).encode(), opts
    )
    if not failed and ok + errors == images:
        storage.write_bytes(layout.uri(cfg.output, layout.SUCCESS), b"", opts)
    _log(
        f"{'done' if not failed else 'FAILED'}: {images} images ({ok} ok, {errors} errors); this run wrote "
        f"{counts['shards_done']} shards at {images_per_s:.1f} img/s, "
        f"{len(committed)} shards were already committed, {len(failed)} failed; "
        f"{elapsed:.1f} s in all (start-up {t_ready - t_start:.1f} s) -> {cfg.output}"
    )
    return manifest


class _InputCheck(threading.Thread):
    """On a resume: list the input again and compare it with the plan, while the shards run.

    With ``refresh`` the added inputs become new shards (appended to the plan, then queued)."""

    def __init__(self, plan: Plan, source: Source, refresh: bool, out: queue.Queue) -> None:
        super().__init__(name="lnstd-input-check", daemon=True)
        self.plan, self.source, self.refresh, self.out = plan, source, refresh, out
        self.diff = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.diff = self.plan.diff(self.source, keep_added=self.refresh)
            notice = self.diff.notice(self.refresh)
            if notice:
                _log(notice)
            if self.refresh and self.diff.added_items:
                first = self.plan.shards
                new = self.plan.extend(self.diff.added_items)
                size = int(self.plan.meta["shard_size"])
                for k, shard in enumerate(new):
                    self.out.put((shard, self.diff.added_items[k * size : (k + 1) * size]))
                _log(f"plan: {len(new)} new shards ({first}..{first + len(new) - 1})")
        except Exception as exc:  # the plan is finished as recorded either way
            self.error = _last_line(exc)

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
