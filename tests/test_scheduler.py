"""The scheduler and the replica pool without a cluster: a backend that answers like Ray's (references,
typed failures), scripted per shard. These pin the loop's rules; the real-Ray runs in test_job.py,
test_exactly_once.py and test_multinode.py exercise the same code end to end."""

from __future__ import annotations

import itertools
import queue
import threading
import time

import pytest

from lnstd.config import RunConfig
from lnstd.errors import LeaseLostError, ModelError, OutputError, ResourceError
from lnstd.jobs.pool import ActorLost, CallFailed, ReplicaPool
from lnstd.jobs.records import ReplicaInfo, ShardResult
from lnstd.jobs.scheduler import CLOSED, SHARD_TRIES, Scheduler, ShardSource

SHARD_IMAGES = 4


class FakeBackend:
    """Replicas that answer at once. ``script[shard]``: outcomes of that shard's successive calls
    ("ok", "fail": the call raises in a live actor, "lost": the actor dies); "ok" when unscripted.
    ``starts``: outcomes of successive replica start-ups ("ok", "init": its constructor raises,
    "lost", "blind": its node cannot see the output, "never": it never becomes ready)."""

    def __init__(self, fit: int = 2, script=None, starts=None) -> None:
        self.fit = fit
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.starts = list(starts or [])
        self.ids = itertools.count()
        self.pending: dict[object, object] = {}  # ref -> value or exception (answered refs only)
        self.spawned: list[str] = []
        self.dead: set[str] = set()
        self.reported: set[str] = set()  # dead actors whose loss the driver has been told of
        self.killed: set[str] = set()
        self.calls: list[tuple[str, int]] = []  # (actor, shard), in order

    def spawn(self):
        actor = f"actor-{next(self.ids)}"
        self.spawned.append(actor)
        ref = ("info", actor)
        how = self.starts.pop(0) if self.starts else "ok"
        if how == "never":
            return actor, ref
        self.pending[ref] = {
            "ok": ReplicaInfo(1000 + len(self.spawned), "cpu", actor, "127.0.0.1"),
            "blind": ReplicaInfo(1, "cpu", actor, "10.1.2.3", cannot_see="the output /x"),
            "init": ActorLost("ValueError: bad checkpoint", init_failed=True),
            "lost": ActorLost("the node died"),
        }[how]
        return actor, ref

    def process(self, actor, shard):
        assert actor not in self.reported | self.killed, f"{actor} is known gone but got shard {shard}"
        self.calls.append((actor, shard))
        ref = ("call", len(self.calls), actor)
        how = self.script.get(shard, []).pop(0) if self.script.get(shard) else "ok"
        if actor in self.dead:  # submitted before the driver learnt of the death: fails the same way
            self.pending[ref] = ActorLost("the actor died unexpectedly")
        elif how == "lost":
            self.dead.add(actor)
            self.pending[ref] = ActorLost("the actor died unexpectedly")
        elif how == "fail":
            self.pending[ref] = CallFailed(f"RuntimeError: shard {shard} broke")
        else:
            self.pending[ref] = ShardResult(shard, SHARD_IMAGES, SHARD_IMAGES - 1, 1, node_id="n1")
        return ref

    def wait(self, refs, timeout):
        wanted = set(refs)
        ready = [r for r in self.pending if r in wanted]  # in the order they were answered
        if not ready:
            time.sleep(min(timeout, 0.01))
        return ready[:1]

    def get(self, ref):
        value = self.pending.pop(ref)
        if isinstance(value, ActorLost) and ref[0] == "call":
            self.reported.add(ref[2])
        if isinstance(value, Exception):
            raise value
        return value

    def kill(self, actor):
        self.killed.add(actor)

    def fits(self):
        return self.fit, "2 CPUs and 0 GPUs"


def _cfg(actors: int = 2) -> RunConfig:
    return RunConfig(input="/in", output="/out", model="vit_tiny_patch16_224", methods=["gae"], actors=actors)


def _run(backend: FakeBackend, shards: int, refresh=None, lost=None, startup_timeout=5.0) -> Scheduler:
    pool = ReplicaPool(backend, _cfg(), external=False)
    pool.wait_first(startup_timeout)
    sched = Scheduler(pool, ShardSource(shards, set(), refresh), lost or threading.Event(),
                      shards * SHARD_IMAGES, startup_timeout, "/out")  # fmt: skip
    sched.run()
    return sched


def test_every_shard_runs_once_when_nothing_fails():
    b = FakeBackend()
    sched = _run(b, 7)
    assert sorted(s for _, s in b.calls) == list(range(7))
    assert sched.counts == {"shards_done": 7, "images": 28, "ok": 21, "errors": 7} and not sched.failed
    assert {a for a, _ in b.calls} == {"actor-0", "actor-1"}  # both replicas were used


def test_a_failing_shard_is_retried_until_it_succeeds_or_has_failed_its_tries():
    b = FakeBackend(script={2: ["fail", "fail"], 5: ["fail"] * SHARD_TRIES})
    sched = _run(b, 7)
    runs = {s: sum(1 for _, x in b.calls if x == s) for s in range(7)}
    assert runs == {0: 1, 1: 1, 2: 3, 3: 1, 4: 1, 5: SHARD_TRIES, 6: 1}
    assert [f["shard"] for f in sched.failed] == [5] and "shard 5 broke" in sched.failed[0]["error"]
    assert sched.counts["shards_done"] == 6 and sched.tries == {2: 2, 5: SHARD_TRIES}


def test_a_lost_actor_is_replaced_and_its_shard_runs_again_elsewhere(capsys):
    b = FakeBackend(script={3: ["lost"]})
    sched = _run(b, 6)
    dead = next(a for a, s in b.calls if s == 3)
    assert b.dead == {dead} and len(b.spawned) == 3  # two wanted, one replacement
    assert [a for a, s in b.calls if s == 3][-1] != dead  # retried on a live replica
    assert sched.counts["shards_done"] == 6 and not sched.failed
    assert "actor lost on shard 3; replacing it" in capsys.readouterr().err


def test_a_shard_whose_actors_keep_dying_fails_after_its_tries():
    b = FakeBackend(script={0: ["lost"] * SHARD_TRIES})
    sched = _run(b, 1)
    assert [f["shard"] for f in sched.failed] == [0] and sched.counts["shards_done"] == 0
    assert len(b.spawned) == 2 + SHARD_TRIES and len(b.reported) == SHARD_TRIES


def test_the_loop_waits_for_the_refresh_sentinel_and_runs_what_came_before_it():
    q: queue.Queue[int] = queue.Queue()
    b = FakeBackend()
    finished = threading.Event()

    def input_check() -> None:
        time.sleep(0.3)
        q.put(2)  # the plan grew by one shard while the first two ran
        time.sleep(0.3)
        assert not finished.is_set()  # the loop must still be waiting for the sentinel
        q.put(CLOSED)

    t = threading.Thread(target=input_check)
    t.start()
    _run(b, 2, refresh=q)
    finished.set()
    t.join()
    assert sorted(s for _, s in b.calls) == [0, 1, 2]


def test_a_lost_lease_stops_the_loop():
    lost = threading.Event()
    lost.set()
    with pytest.raises(LeaseLostError, match="lost the output's lease"):
        _run(FakeBackend(), 3, lost=lost)


def test_no_ready_actor_for_the_startup_timeout_is_a_resource_error():
    b = FakeBackend(starts=["never", "never"])
    with pytest.raises(ResourceError, match=r"no node could take an actor .* within 0 s"):
        _run(b, 1, startup_timeout=0.2)


def test_the_loop_gives_up_when_every_actor_is_lost_and_none_starts_again():
    b = FakeBackend(script={0: ["lost", "lost"]}, starts=["ok", "ok", "never", "never"])
    with pytest.raises(ResourceError, match="no actor has been running for 0 s"):
        _run(b, 1, startup_timeout=0.3)
    assert b.reported == {"actor-0", "actor-1"} and len(b.spawned) == 4


def test_the_pool_starts_what_fits_and_refuses_what_cannot_fit(capsys):
    b = FakeBackend(fit=1)
    pool = ReplicaPool(b, _cfg(actors=3), external=False)
    assert len(pool.starting) == 1 and "only 1 of 3 actors fit" in capsys.readouterr().err
    assert len(ReplicaPool(FakeBackend(fit=1), _cfg(actors=3), external=True).starting) == 3  # may grow
    with pytest.raises(ResourceError, match="an actor needs 1 CPUs"):
        ReplicaPool(FakeBackend(fit=0), _cfg(), external=False)


def test_a_replica_whose_constructor_fails_stops_the_run_only_if_none_is_ready():
    with pytest.raises(ModelError, match="could not start: ValueError: bad checkpoint"):
        ReplicaPool(FakeBackend(starts=["init", "init"]), _cfg(), external=False).wait_first(5)
    pool = ReplicaPool(FakeBackend(starts=["ok", "init"]), _cfg(), external=False)
    pool.wait_first(5)
    pool.admit(next(iter(pool.starting)))
    assert len(pool.ready) == 1 and not pool.starting  # went on with one, started no other


def test_a_replica_lost_while_starting_is_replaced():
    b = FakeBackend(starts=["lost", "ok"])
    pool = ReplicaPool(b, _cfg(actors=1), external=False)
    pool.wait_first(5)
    assert len(b.spawned) == 2 and pool.ready == ["actor-1"]


def test_a_node_that_cannot_see_the_output_stops_the_run_naming_it():
    b = FakeBackend(starts=["blind"])
    pool = ReplicaPool(b, _cfg(actors=1), external=False)
    with pytest.raises(OutputError, match="the actor on node 10.1.2.3 cannot read the output /x"):
        pool.wait_first(5)
    assert b.killed == {"actor-0"}
