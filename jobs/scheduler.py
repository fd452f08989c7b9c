"""One loop that runs a plan's shards on a pool of replicas: what to run next, what came back.

:class:`ShardSource` says which shard comes next (retries, the plan's uncommitted shards, shards the
input check appends); :class:`Scheduler` starts them on free replicas, collects results, retries
failures and counts progress; :class:`InputCheck` lists the input again on a resume, in a thread,
and appends new inputs as shards (``--refresh-input``). The scheduler talks to the cluster only
through its pool (:class:`~lnstd.jobs.pool.ReplicaPool` and its backend), so it runs without Ray in
the unit tests.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from typing import Any

from lnstd.data import Source
from lnstd.errors import LeaseLostError, ResourceError
from lnstd.plan import Plan, PlanDiff

from .console import last_line, log
from .pool import ActorLost, CallFailed, ReplicaPool

__all__ = ["CLOSED", "SHARD_TRIES", "InputCheck", "Scheduler", "ShardSource"]

SHARD_TRIES = 3  # attempts per shard: actor losses and shard-level faults together
CLOSED = -1  # the input check's sentinel: no more shards will come from it


class ShardSource:
    """The shard numbers left to attribute, in order: retries first, then the plan's uncommitted
    shards (counted, never listed), then shards appended by ``--refresh-input`` (a queue that the
    input check closes with :data:`CLOSED`). Exhausted only once that sentinel has arrived, so a
    shard queued at the moment the scheduler drains is still run."""

    def __init__(self, shards: int, committed: set[int], refresh: queue.Queue[int] | None) -> None:
        self._next = 0
        self._end = shards
        self._committed = committed
        self._retries: collections.deque[int] = collections.deque()
        self._refresh = refresh
        self._open = refresh is not None

    def retry(self, shard: int) -> None:
        """Run ``shard`` again, before any other."""
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
            if shard == CLOSED:
                self._open = False
            else:
                return shard
        return None

    @property
    def exhausted(self) -> bool:
        """Nothing is left and nothing more can come."""
        return not self._retries and self._next >= self._end and not self._open


class Scheduler:
    """One loop: start shards on free actors, collect results, retry failures, count progress.

    Args:
        pool: the replicas (its backend's ``wait`` is the loop's only blocking call).
        source: the shards to run.
        lost: set when the run loses the output's lease (the loop stops at once).
        images: the plan's inputs (the progress bar's total).
        startup_timeout: how long the loop waits with no ready actor before giving up.
        output: the output, for messages.
    """

    def __init__(
        self,
        pool: ReplicaPool,
        source: ShardSource,
        lost: threading.Event,
        images: int,
        startup_timeout: float,
        output: str,
        progress: bool = False,
    ) -> None:
        from tqdm import tqdm

        self.pool, self.source, self.lost = pool, source, lost
        self.startup_timeout, self.output = startup_timeout, output
        self.tries: dict[int, int] = {}  # failures so far, per shard that failed at least once
        self.counts = {"shards_done": 0, "ok": 0, "errors": 0, "images": 0}
        self.failed: list[dict[str, Any]] = []
        self.nodes: dict[str, int] = {}
        self.actor_rss = 0.0
        self.t_ready = time.time()
        self.t_done: float | None = None
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=images, unit="img", disable=not progress, mininterval=1.0,
                        file=sys.stderr, dynamic_ncols=True, bar_format=fmt)  # fmt: skip

    def rate(self) -> float:
        """Images per second of the attribution phase (so far, or in all once it is over)."""
        end = self.t_done if self.t_done is not None else time.time()
        return self.counts["images"] / max(end - self.t_ready, 1e-9)

    def run(self, skipped_images: int = 0) -> None:
        """Until every shard has run (or failed ``SHARD_TRIES`` times)."""
        self.bar.update(skipped_images)
        idle_since: float | None = None
        while True:
            if self.lost.is_set():
                raise LeaseLostError(
                    f"{self.output}: this run lost the output's lease to another run; stopped"
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
            elif time.time() - idle_since > self.startup_timeout:
                raise ResourceError(
                    f"no actor has been running for {self.startup_timeout:.0f} s: the cluster lost its nodes"
                )
            ready = self.pool.backend.wait(self.pool.waiting, timeout=1.0)
            if ready:
                self._collect(ready[0])
        self.t_done = time.time()  # the attribution phase ends here: the bar and the summary agree
        self.bar.set_postfix_str(f"{self.rate():.1f} img/s", refresh=False)

    def close(self) -> None:
        """Close the progress bar (the loop may run again before: a shard to redo)."""
        self.bar.close()

    @property
    def failed_shards(self) -> set[int]:
        return {f["shard"] for f in self.failed}

    def _collect(self, ref: Any) -> None:
        if ref in self.pool.starting:
            self.pool.admit(ref)
            return
        try:
            _, res = self.pool.finished(ref)
        except ActorLost as exc:
            log(f"actor lost on shard {exc.shard}; replacing it ({exc.why})")
            self._retry(exc.shard, exc.why, said=True)
            return
        except CallFailed as exc:
            self._retry(exc.shard, exc.why)
            return
        self.counts["shards_done"] += 1
        self.counts["ok"] += res.ok
        self.counts["errors"] += res.errors
        self.counts["images"] += res.images
        self.actor_rss = max(self.actor_rss, res.peak_rss_mb)
        node = res.node_id or "?"
        self.nodes[node] = self.nodes.get(node, 0) + 1
        self.bar.set_postfix_str(f"{self.rate():.1f} img/s", refresh=False)
        self.bar.update(res.images)

    def _retry(self, shard: int, why: str, said: bool = False) -> None:
        """Queue ``shard`` again, or record it failed after :data:`SHARD_TRIES` tries (``said``: the
        caller has told the user already)."""
        tries = self.tries.get(shard, 0) + 1
        self.tries[shard] = tries
        if tries < SHARD_TRIES:
            if not said:
                log(f"shard {shard} failed ({why}); retrying")
            self.source.retry(shard)
        else:
            self.failed.append({"shard": shard, "error": why})
            log(f"shard {shard} failed {SHARD_TRIES} times: {why}")


class InputCheck(threading.Thread):
    """On a resume: list the input again and compare it with the plan, while the shards run.

    With ``refresh`` the added inputs become new shards (appended to the plan, then their numbers
    queued). The queue is closed with :data:`CLOSED` whatever happens, so the scheduler never waits
    for a check that is over, nor finishes before it is.

    Its writes go through the plan's output, under the run's fence.
    """

    def __init__(self, plan: Plan, source: Source, refresh: bool, out: queue.Queue[int]) -> None:
        super().__init__(name="lnstd-input-check", daemon=True)
        self.plan, self.source, self.refresh, self.out = plan, source, refresh, out
        self.diff: PlanDiff | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.diff = self.plan.diff(self.source, keep_added=self.refresh)
            notice = self.diff.notice(self.refresh)
            if notice:
                log(notice)
            if self.refresh and self.diff.added_items:
                # The output stops being complete before the plan grows: a run killed from here on
                # leaves no _SUCCESS (nor a manifest) that claims the old plan's totals.
                self.plan.out.mark_incomplete()
                new = self.plan.extend(self.diff.added_items)
                self.diff.added_items = []
                for shard in new:
                    self.out.put(shard)
                log(f"plan: {len(new)} new shards ({new[0]}..{new[-1]})")
        except Exception as exc:  # the plan is finished as recorded either way
            self.error = last_line(exc)
        finally:
            self.out.put(CLOSED)

    def summary(self) -> dict[str, Any] | None:
        """What the check found, for the manifest."""
        if self.diff is None:
            return {"error": self.error} if self.error else None
        return {"added": self.diff.added, "removed": self.diff.removed, "refreshed": self.refresh}
