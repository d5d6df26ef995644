"""Run an actor only while this node holds its lease: a transform, a poll source, the alerter.

`Singleton(lease, actor, node)` is itself an actor for the supervisor. It reports started at
once (a node waiting for a lease is healthy and ready: it still ingests and delivers), then:

    1. waits until `node` is granted the lease (`daemon.cluster.node`);
    2. runs `actor.run()` under the lease's fence (`daemon.store.fencing.fenced`): every store
       call the actor makes, from any task it starts, carries the fence, and the store refuses a
       singleton commit whose token is no longer current (`LeaseLost`);
    3. cancels the actor as soon as the lease is lost (a renewal refused, or its local deadline
       passed without one) or a commit raised `LeaseLost`, and goes back to 1. A cut-off batch
       is not lost: a transform's outputs and cursor, a poll page and its position, a window and
       its removal each commit in one transaction, so whoever holds the lease next re-reads the
       position the last commit left;
    4. on a clean stop (reload, shutdown) lets the lease go at once, so that another node takes it
       at its next heartbeat instead of after `lease_ttl`.

Restarts: an exception other than `LeaseLost` from the actor is raised as is; the supervisor
restarts the wrapper (its backoff and budget apply) and the lease is acquired again, with a new
token. An actor that returns on purpose ends the wrapper too.

Cancellation: `trio.Cancelled` is never caught; the release on the way out is shielded and
bounded by the database timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import final

import trio

from daemon.cluster.node import LeaseSlot, Node
from daemon.errors import LeaseLost
from daemon.store import fencing
from daemon.store.fencing import Fence
from daemon.supervisor import Actor

log = logging.getLogger("ferry.cluster")


def only_lease_lost(exc: BaseException) -> bool:
    """Whether `exc` is `LeaseLost`, or a group of nothing else (nurseries wrap errors)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_lease_lost(inner) for inner in exc.exceptions)
    return isinstance(exc, LeaseLost)


@final
class Singleton:
    """`actor` run on one node of the cluster at a time; see the module docstring."""

    def __init__(self, lease: str, actor: Actor, node: Node) -> None:
        self.lease = lease
        self.actor = actor
        self._node = node
        self.role = "standby"
        """`standby` (waiting for the lease) or `leader` (running the actor)."""
        self.acquisitions = 0

    def __repr__(self) -> str:
        return f"<Singleton {self.lease} {self.role}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        slot = self._node.want(self.lease)
        task_status.started()
        fence: Fence | None = None
        try:
            while True:
                while not slot.held:
                    await slot.changed()
                fence = slot.fence
                assert fence is not None
                self.role = "leader"
                self.acquisitions += 1
                finished = await self._lead(slot, fence)
                self.role = "standby"
                if finished:
                    return
        finally:
            self.role = "standby"
            self._node.unwant(self.lease)
            if fence is not None and slot.fence == fence:
                await self._node.release(fence)

    async def _lead(self, slot: LeaseSlot, fence: Fence) -> bool:
        """Run the actor while `fence` is current; whether it returned on purpose."""
        returned = False
        try:
            with fencing.fenced(fence):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, slot, fence, nursery.cancel_scope)
                    await self.actor.run()
                    returned = True
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            if not only_lease_lost(exc):
                raise
            log.warning(
                "singleton stopped: its lease was taken over",
                extra={"fields": {"lease": self.lease, "token": fence.token}},
            )
            if slot.fence == fence:
                slot.lose()
        return returned

    async def _watch(self, slot: LeaseSlot, fence: Fence, scope: trio.CancelScope) -> None:
        """Cancel the actor once `fence` is no longer held (lost, or its deadline passed)."""
        while slot.fence == fence and trio.current_time() < slot.deadline:
            with trio.move_on_at(slot.deadline):
                await slot.changed()
        log.warning(
            "singleton stopped: lease lost", extra={"fields": {"lease": self.lease, "token": fence.token}}
        )
        if slot.fence == fence:
            slot.lose()
        scope.cancel()


def under_lease(node: Node | None, lease: str, actor: Actor) -> Actor:
    """`actor` as a singleton of the cluster `node` belongs to; `actor` itself on one SQLite node."""
    return actor if node is None else Singleton(lease, actor, node)


def leased(node: Node | None, lease: str, incarnations: Callable[[], Actor]) -> Callable[[], Actor]:
    """A supervisor's factory of fresh incarnations, each run under `lease` (`under_lease`)."""
    if node is None:
        return incarnations
    return lambda: Singleton(lease, incarnations(), node)


__all__ = ["Singleton", "leased", "only_lease_lost", "under_lease"]
