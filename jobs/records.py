"""What an actor tells the driver: typed records that cross the Ray boundary (pickled)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReplicaInfo", "ShardResult"]


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica's start-up facts: where it runs, and what of the run's storage its node cannot see
    (``cannot_see``: a phrase naming the output or the input; None when it sees both)."""

    pid: int
    device: str
    node_id: str
    node_ip: str
    cannot_see: str | None = None

    @property
    def node(self) -> str:
        """The node in words (its address, else the start of its id)."""
        return self.node_ip or self.node_id[:12]


@dataclass(frozen=True)
class ShardResult:
    """One shard's outcome: its counts (``skipped``: it had been committed before this call)."""

    shard: int
    images: int
    ok: int
    errors: int
    skipped: bool = False
    rows: int = 0
    peak_rss_mb: float = 0.0
    node_id: str = ""
