"""Cluster-wide control: every node obeys the pauses and the drain stored in the database.

In cluster mode `ferry ctl pause/resume/drain` on any node write their state to the database
(`daemon.store.coordination`) as well as applying it at once on that node; every other node
reads it at its next heartbeat (`daemon.cluster.node`), so within `[cluster] heartbeat`
(plus a beat's round trip) every node has applied it. `Follower` is what applies it:

Pauses:
    The database's set is the truth: a sink or poll source in it is paused on this node, one not
    in it resumed; a webhook source in it answers 503 (with `Retry-After`) on every node. Pauses
    outlive a node's restart in cluster mode (a node starting joins the cluster's state); on one
    SQLite node they stay in memory as before.

Drain:
    A node that sees a drain begun since it started (or under way when it started) joins it:
    every webhook source answers 503 and its poll sources stop after the cycle under way;
    transforms and sinks keep working. The node that took the command waits until nothing is due
    cluster-wide (the counts are the shared database's), marks the drain done, answers and stops;
    every node that joined stops once it sees the drain done, or past its deadline — also a node
    whose first sight of a short drain is already its end. A node started after a drain ended
    ignores it.

Work written by other nodes:
    A store's wake-ups are in-process: a commit on one node wakes that node's consumers only.
    Other nodes hear of it at once by notification (`daemon.store.postgres.wake`, `.listener`);
    as the fallback for a missed one, each beat also wakes every transform and sink here
    (`wake`), which then look for rows other nodes wrote (events to transform, deliveries due,
    retried dead letters, replays): work another node wrote waits at most one heartbeat here even
    then, and an idle node costs one indexed query per consumer per heartbeat.

`dlq retry`, `dlq purge` and `replay` need nothing else: they are store operations on the shared
database, so their rows are every node's (each node's sinks find due rows in the database), and
the audit trail is one table for the whole cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol, final

import trio
from msgspec import Struct

from daemon.cluster.node import Node
from daemon.store.coordination import Beat

log = logging.getLogger("ferry.cluster")


class Pausable(Protocol):
    """A sink or a poller, as pauses see it."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Holds(Protocol):
    """The node's webhook pauses and drain flag (`daemon.running.Pauses`)."""

    sources: set[str]
    draining: bool


class NodeStatus(Struct, frozen=True):
    """One node as `ferry ctl status` lists it."""

    id: str
    host: str
    address: str
    pid: int
    heartbeat_age_s: float
    alive: bool
    leases: list[str]
    this: bool = False


@final
class Follower:
    """Applies each beat's pauses and drain to this node; see the module docstring."""

    def __init__(
        self,
        *,
        sinks: Callable[[], Mapping[str, Pausable]],
        pollers: Callable[[], Mapping[str, Pausable]],
        webhooks: Callable[[], set[str]],
        holds: Holds,
        stop: trio.Event,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._sinks, self._pollers, self._webhooks = sinks, pollers, webhooks
        self._holds, self._stop, self._wake = holds, stop, wake
        self.joined: int | None = None
        """The drain this node joined, if any."""
        self._baseline: int | None = None
        """The latest drain when this node first beat: older ones are not its business."""

    def __call__(self, beat: Beat) -> None:
        self._wake()
        drain = beat.drain
        number = drain.number if drain is not None else 0
        if self._baseline is None:  # first beat: a drain under way is joined, an ended one ignored
            self._baseline = number - 1 if drain is not None and drain.active else number
        if drain is not None and number > self._baseline and self.joined is None:
            self.join(number)  # even one already over: it began after this node started
        self.apply_pauses(beat.paused)
        over = drain is not None and drain.number == self.joined and not drain.active
        if over and drain is not None and not self._stop.is_set():
            log.info("cluster drain over: stopping", extra={"fields": {"drain": drain.number}})
            self._stop.set()

    def join(self, number: int) -> None:
        """Take part in drain `number`: stop intake here until it ends, then stop."""
        self.joined = number
        self._holds.draining = True
        for poller in self._pollers().values():
            poller.pause()
        log.info("cluster drain: intake stopped", extra={"fields": {"drain": number}})

    def apply_pauses(self, paused: frozenset[str]) -> None:
        draining = self.joined is not None
        for name, sink in self._sinks().items():
            _hold(sink, name in paused)
        for name, poller in self._pollers().items():
            _hold(poller, name in paused or draining)  # a drain keeps poll sources stopped
        webhooks = self._webhooks()
        self._holds.sources.clear()
        self._holds.sources.update(name for name in paused if name in webhooks)


def _hold(actor: Pausable, paused: bool) -> None:
    if paused and not actor.paused:
        actor.pause()
    elif not paused and actor.paused:
        actor.resume()


async def node_statuses(node: Node) -> list[NodeStatus]:
    """Every node the database knows of, this one marked (raises `StoreUnavailable`)."""
    rows = await node.coordination.nodes(node.config.dead_after)
    return [
        NodeStatus(
            row.id,
            row.host,
            row.address,
            row.pid,
            round(row.heartbeat_age, 3),
            row.alive,
            row.leases,
            this=row.id == node.info.id,
        )
        for row in rows
    ]


__all__ = ["Follower", "Holds", "NodeStatus", "Pausable", "node_statuses"]
