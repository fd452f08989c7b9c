"""The model replicas of a run: Ray started or joined, actors placed, started, replaced.

:class:`ReplicaPool` keeps the actors (starting, ready, their load) and hands shards to them. It talks
to Ray through a :class:`Backend`: :class:`RayBackend` in a run, another object with the same five
methods in the unit tests (so the pool and the scheduler are tested without a cluster).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from typing import Any, Protocol

import ray

from lnstd.config import RunConfig
from lnstd.errors import LeaseLostError, ModelError, OutputError, ResourceError
from lnstd.storage import StorageError

from .console import last_line, log
from .records import ReplicaInfo, ShardResult

__all__ = ["ActorLost", "Backend", "CallFailed", "RayBackend", "ReplicaPool", "ray_init"]

LOAD = 2  # shards in flight per actor: the next one is queued while the current one runs


class CallFailed(Exception):
    """A shard call raised inside a replica that lives on (a fault of the shard). ``shard`` is set
    once the pool knows which call it was."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.shard = -1


class ActorLost(CallFailed):
    """A replica is gone (its process or node died, it was killed). ``init_failed``: its constructor
    raised, so another replica would fail the same way."""

    def __init__(self, why: str, init_failed: bool = False) -> None:
        super().__init__(why)
        self.init_failed = init_failed


class Backend(Protocol):
    """What the pool and the scheduler need from the cluster."""

    def spawn(self) -> tuple[Any, Any]:
        """Start one replica: (its handle, the reference its :class:`ReplicaInfo` will come from)."""

    def process(self, actor: Any, shard: int) -> Any:
        """Start ``shard`` on ``actor``: the reference its :class:`ShardResult` will come from."""

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        """The references among ``refs`` that are ready (at most one), waiting up to ``timeout``."""

    def get(self, ref: Any) -> Any:
        """A ready reference's value; raises :class:`ActorLost` or :class:`CallFailed`."""

    def kill(self, actor: Any) -> None:
        """Stop a replica now."""

    def fits(self) -> tuple[int, str]:
        """How many replicas the live nodes can hold now, and the largest node in words."""


def ray_init(cfg: RunConfig) -> bool:
    """Start or join Ray; returns True for an existing cluster (which may autoscale).

    Raises:
        ResourceError: no cluster answers at ``--address``, or Ray could not start (one line).
    """
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
        raise ResourceError(f"--address {address}: no Ray cluster answers there ({last_line(exc)})") from None
    except Exception as exc:  # Ray's own start-up failures (a node that timed out, an overloaded GCS)
        where = f"--address {address}" if address else "this machine's Ray cluster"
        raise ResourceError(
            f"{where} could not start ({last_line(exc)}); run the same command again, or -v for Ray's log"
        ) from None
    finally:
        os.chdir(here)
    return bool(address)


class RayBackend:
    """:class:`Backend` on Ray: one :class:`~lnstd.jobs.worker.ShardWorker` actor per replica.

    Placement is judged from the live nodes' resources (:meth:`fits`) rather than a placement group:
    a pool takes the replicas that fit now and the rest as nodes appear (an autoscaling cluster),
    which a group's all-or-nothing reservation would not allow.
    """

    def __init__(self, cfg: RunConfig, run_id: str, probe: str, fence: tuple[str, int]) -> None:
        from .worker import ShardWorker

        self.cfg, self.run_id, self.probe, self.fence = cfg, run_id, probe, fence
        self.remote = ray.remote(ShardWorker).options(
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0, max_task_retries=0
        )

    def spawn(self) -> tuple[Any, Any]:
        actor = self.remote.remote(self.cfg.to_dict(), self.run_id, self.fence)
        return actor, actor.info.remote(self.probe)

    def process(self, actor: Any, shard: int) -> Any:
        return actor.process.remote(shard)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        return ray.wait(refs, num_returns=1, timeout=timeout)[0]

    def get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise ActorLost(last_line(exc), init_failed=True) from None
            # Ray's first sentence says what happened ("... its worker process has died", "... its
            # node has died"); the rest is a troubleshooting guide, in Ray's log for who wants it.
            raise ActorLost(last_line(exc).split(". ")[0].rstrip("."), init_failed=False) from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LeaseLostError):  # every other shard would meet the same: stop now
                raise LeaseLostError(str(cause)) from None
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                raise StorageError(f"no space left where the output is written ({last_line(exc)})") from None
            raise CallFailed(last_line(exc)) from None

    def kill(self, actor: Any) -> None:
        ray.kill(actor)

    def fits(self) -> tuple[int, str]:
        best, total = (0.0, 0.0), 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            cpu, gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
            n = math.inf
            if self.cfg.cpus_per_actor > 0:
                n = min(n, math.floor(cpu / self.cfg.cpus_per_actor + 1e-9))
            if self.cfg.gpus_per_actor > 0:
                n = min(n, math.floor(gpu / self.cfg.gpus_per_actor + 1e-9))
            total += self.cfg.actors if n == math.inf else int(n)
            best = max(best, (cpu, gpu))
        return total, f"{best[0]:g} CPUs and {best[1]:g} GPUs"


class ReplicaPool:
    """The model replicas: actors waiting for a node, ready ones with their load, replacements.

    :meth:`submit` hands a shard number to the least loaded ready actor (``LOAD`` in flight each);
    the scheduler waits on :attr:`waiting` (in-flight calls and actors still starting) and passes
    what is ready to :meth:`admit` or :meth:`finished`.

    Args:
        backend: the cluster (:class:`RayBackend` in a run).
        cfg: the run's configuration (actors wanted, resources per actor).
        external: an existing cluster (it may grow): start every wanted actor even if fewer fit now.
    """

    def __init__(self, backend: Backend, cfg: RunConfig, external: bool) -> None:
        self.backend, self.cfg = backend, cfg
        fit, largest = backend.fits()
        want = cfg.actors
        if fit == 0 and not external:
            raise ResourceError(
                f"an actor needs {cfg.cpus_per_actor:g} CPUs and {cfg.gpus_per_actor:g} GPUs, but this "
                f"machine has {largest}: lower --cpus-per-actor / --gpus-per-actor"
            )
        if fit < want and not external:
            log(f"only {fit} of {want} actors fit on this machine ({largest}); starting {fit}")
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
        actor, info = self.backend.spawn()
        self.starting[info] = actor

    def wait_first(self, timeout: float) -> None:
        """Block until one actor is ready; clear errors if none can start."""
        deadline = time.time() + timeout
        warned = False
        while not self.ready:
            if not self.starting:
                raise ResourceError("no actor could be started")
            done = self.backend.wait(list(self.starting), timeout=min(5.0, timeout))
            if done:
                self.admit(done[0])
                continue
            if not warned and self.backend.fits()[0] == 0:
                warned = True
                need = f"{self.cfg.cpus_per_actor:g} CPUs and {self.cfg.gpus_per_actor:g} GPUs"
                log(f"waiting for a node with {need} for an actor (up to {timeout:.0f} s)")
            if time.time() > deadline:
                raise ResourceError(
                    f"no node could take an actor ({self.cfg.cpus_per_actor:g} CPUs, "
                    f"{self.cfg.gpus_per_actor:g} GPUs) within {timeout:.0f} s; the largest node has "
                    f"{self.backend.fits()[1]}"
                )

    def admit(self, ref: Any) -> None:
        """An actor's start-up call returned: it is ready, or it failed to start, or its node
        cannot see the run's storage (then the run stops: its commits would be lost)."""
        actor = self.starting.pop(ref)
        try:
            info: ReplicaInfo = self.backend.get(ref)
        except ActorLost as exc:
            if exc.init_failed:  # its constructor raised: the same error would repeat
                if not self.ready:
                    raise ModelError(f"the model replica could not start: {exc.why}") from None
                log(f"an actor could not start ({exc.why}); going on with {len(self.ready)}")
                return
            self.start_losses += 1
            if self.start_losses > 3 * max(1, self.cfg.actors):
                raise ResourceError(
                    f"actors keep dying while they start ({exc.why}); rerun with --verbose to see why"
                ) from None
            log(f"an actor was lost while starting ({exc.why}); starting another")
            self.spawn()
            return
        except CallFailed as exc:  # its look at the storage raised (its node lacks the credentials)
            self.backend.kill(actor)
            raise OutputError(
                f"an actor could not reach the run's storage ({exc.why}): every node needs the "
                "storage's credentials"
            ) from None
        if info.cannot_see:
            self.backend.kill(actor)
            raise OutputError(
                f"the actor on node {info.node} cannot read {info.cannot_see}: every node must see the "
                "input and the output; a multi-node run needs s3:// (or a file system shared by every "
                "node) for --input and --output"
            )
        self.ready.append(actor)
        self.load[actor] = 0
        log(f"actor {len(self.ready) - 1} ready (pid {info.pid}, {info.device})")

    def submit(self, shard: int) -> bool:
        """Start ``shard`` on the least loaded ready actor with room; False if none has room."""
        free = [a for a in self.ready if self.load[a] < LOAD]
        if not free:
            return False
        actor = min(free, key=self.load.__getitem__)
        self.load[actor] += 1
        self.calls[self.backend.process(actor, shard)] = (shard, actor)
        return True

    def finished(self, ref: Any) -> tuple[int, ShardResult]:
        """Collect a returned shard call: (shard, its result).

        Raises:
            ActorLost: the actor died (it is forgotten and a replacement started);
            CallFailed: the shard failed inside a live actor.
        """
        shard, actor = self.calls.pop(ref)
        if actor in self.load:
            self.load[actor] -= 1
        try:
            return shard, self.backend.get(ref)
        except CallFailed as exc:
            exc.shard = shard
            if isinstance(exc, ActorLost):
                self.lost(actor)
            raise

    def lost(self, actor: Any) -> None:
        """Forget a dead actor and start a replacement (placed wherever the cluster has room)."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.load.pop(actor, None)
            self.spawn()

    def stop(self) -> None:
        """Kill every actor now (in-flight shards are abandoned, never committed half)."""
        for actor in [*self.ready, *self.starting.values()]:
            with contextlib.suppress(Exception):
                self.backend.kill(actor)
