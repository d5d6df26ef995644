"""Cluster coordination through the store: nodes, singleton leases with fencing, cluster-wide control.

The runtime (`daemon.cluster`) reaches it through `Coordination`; the PostgreSQL implementation
is `daemon.store.leases.PostgresCoordination`. A SQLite store is one node: it has no
coordination, and every lease is held (the runtime does not wrap singletons at all there).

Guarantees (every implementation):
    Time is the database's (`now()`), never a node's: a lease's expiry, a node's heartbeat and a
    drain's deadline are written and compared on the database's clock, so clock skew between
    nodes changes nothing. A lease's fencing token increases on every acquisition (never on a
    renewal), so an actor that was given token N and lost its lease can be told from the one
    that took it over with N+1; the store's singleton commits check the token in their own
    transaction (`daemon.store.fencing`) and raise `LeaseLost` when it is not current.
    Each call is one transaction: it happened whole or not at all.

Failure policy: fail fast. A call that cannot reach the database raises `StoreUnavailable`
within `database_timeout`; the caller (one heartbeat loop per node) tries again at its next
beat, and the leases it holds run out on their own if it never gets through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol


class NodeInfo(NamedTuple):
    """What a node says about itself in its heartbeat."""

    id: str
    host: str
    address: str
    """Its webhook listener's `host:port` (what a load balancer sends to)."""
    pid: int


class Drain(NamedTuple):
    """A cluster-wide drain: every node stops intake, finishes what is due, then stops."""

    number: int
    active: bool
    """Started and neither finished nor past its deadline."""
    done: bool
    """Finished: every node that joined it stops."""


class Beat(NamedTuple):
    """What one heartbeat learned."""

    granted: dict[str, int]
    """Leases taken by this beat: name → its new fencing token."""
    renewed: dict[str, int]
    """Leases held and renewed: name → token (a held lease missing here is lost)."""
    paused: frozenset[str]
    """Sources and sinks paused cluster-wide."""
    drain: Drain | None
    """The latest drain, if any was ever started."""


class NodeRow(NamedTuple):
    """A node as `ferry ctl status` lists it."""

    id: str
    host: str
    address: str
    pid: int
    started_at: float
    heartbeat_at: float
    """Unix time of its last heartbeat (database clock)."""
    heartbeat_age: float
    """Seconds since its last heartbeat, on the database's clock."""
    alive: bool
    leases: list[str]
    """Leases it holds now (not expired)."""


class LeaseRow(NamedTuple):
    """A lease as the database holds it."""

    name: str
    holder: str | None
    token: int
    remaining: float
    """Seconds until it expires (negative: expired), on the database's clock."""


class Coordination(Protocol):
    """Nodes, leases and cluster-wide control in the shared database. Fails fast."""

    async def beat(self, node: NodeInfo, held: Mapping[str, int], wanted: Sequence[str], ttl: float) -> Beat:
        """Heartbeat `node`; renew the `held` leases (name → token) still ours for `ttl` s; take each of
        `wanted` that is free, expired or already `node`'s (a new token each); read the pauses and
        the drain. One transaction."""
        ...

    async def release(self, node_id: str, name: str, token: int) -> None:
        """Let lease `name` go now if `node_id` still holds it with `token` (a clean stop)."""
        ...

    async def nodes(self, dead_after: float) -> list[NodeRow]:
        """Every node seen within the last hour, alive (heartbeat within `dead_after`) or not."""
        ...

    async def leases(self) -> list[LeaseRow]: ...

    async def set_paused(self, name: str, paused: bool, node_id: str) -> bool:
        """Pause or resume `name` cluster-wide; whether that changed anything."""
        ...

    async def start_drain(self, node_id: str, timeout: float) -> Drain:
        """Begin a drain lasting at most `timeout` s; refused (ValueError) while one is active."""
        ...

    async def finish_drain(self, number: int) -> None:
        """Mark drain `number` done: every node that joined it stops."""
        ...

    async def leave(self, node_id: str) -> None:
        """A node stopping cleanly: its leases expire now and its heartbeat row goes."""
        ...

    async def publish_metrics(self, node_id: str, snapshot: bytes) -> None:
        """Store `node_id`'s metrics (an encoded snapshot), replacing what it published before."""
        ...

    async def cluster_metrics(self, max_age: float) -> dict[str, bytes]:
        """Every node's metrics published within the last `max_age` s (database clock): node id → snapshot."""
        ...

    async def close(self) -> None: ...


__all__ = ["Beat", "Coordination", "Drain", "LeaseRow", "NodeInfo", "NodeRow"]
