"""This node in a cluster: one heartbeat loop that keeps its leases and hears cluster-wide control.

Every `[cluster] heartbeat`, one transaction (`Coordination.beat`) writes the node's heartbeat,
renews the leases it holds, takes the free ones its singletons want and reads the cluster-wide
pauses and drain, which `on_beat` applies to the running daemon (`daemon.cluster.control`).

Leases, locally:
    A lease is held from the beat that granted it until `deadline`: the moment (trio's clock) the
    last successful renewal was *sent* plus `lease_ttl` less one heartbeat. The database set the
    expiry from its own `now()`, which is later than the send, so the local deadline always comes
    before the database's expiry: a node never believes it holds a lease the database already
    gave up. A renewal that is refused (another node took the lease), or a deadline that passes
    with no renewal (the database is unreachable), loses it; the singleton running under it is
    cancelled (`daemon.cluster.singleton`). Correctness does not rest on this timing: the store
    refuses a stale token's commits anyway (`daemon.store.fencing`).

Failover bound:
    A dead node's leases expire `lease_ttl` after its last renewal; another node takes each at
    its next beat, within one heartbeat: at most `lease_ttl + heartbeat`, then the actor starts.

Outages:
    A beat that fails (`StoreUnavailable`) is logged once per outage and tried again at the next
    heartbeat; the node keeps its leases until their deadlines and takes none meanwhile.

Cancellation:
    `run` is cancelled with the daemon; on the way out, `leave` (shielded, bounded by the
    database timeout) lets the node's leases go at once so that a clean stop fails over at the
    other nodes' next beat instead of after `lease_ttl`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, final

import trio

from daemon.config.root import Config, node_id
from daemon.config.sections import ClusterConfig
from daemon.errors import StoreUnavailable
from daemon.store.coordination import Beat, Coordination, NodeInfo
from daemon.store.fencing import Fence

log = logging.getLogger("ferry.cluster")


@final
class LeaseSlot:
    """One singleton's lease as this node sees it: the fence it holds (if any) and until when."""

    __slots__ = ("_changed", "deadline", "fence", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fence: Fence | None = None
        self.deadline = -float("inf")
        self._changed = trio.Event()

    def __repr__(self) -> str:
        held = f"token {self.fence.token}" if self.fence else "not held"
        return f"<LeaseSlot {self.name} {held}>"

    @property
    def held(self) -> bool:
        return self.fence is not None and trio.current_time() < self.deadline

    def grant(self, fence: Fence, deadline: float) -> None:
        self.fence, self.deadline = fence, deadline
        self._fire()

    def extend(self, deadline: float) -> None:
        self.deadline = deadline

    def lose(self) -> None:
        """Forget the fence: the next beat asks for the lease again (with a new token)."""
        if self.fence is not None:
            self.fence, self.deadline = None, -float("inf")
            self._fire()

    async def changed(self) -> None:
        """Wait until the slot is granted or lost."""
        await self._changed.wait()

    def _fire(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def this_node(address: str, node_id: str | None = None) -> NodeInfo:
    """This process as a node: its id (given, or `HOST:PID`), host, listener address and pid."""
    host = socket.gethostname()
    return NodeInfo(node_id or f"{host}:{os.getpid()}", host, address, os.getpid())


@final
class Node:
    """The heartbeat loop and the lease slots of one node; see the module docstring."""

    def __init__(
        self,
        coordination: Coordination,
        info: NodeInfo,
        config: ClusterConfig,
        *,
        on_beat: Callable[[Beat], None] | None = None,
    ) -> None:
        self.coordination = coordination
        self.info = info
        self.config = config
        self.on_beat = on_beat
        self.slots: dict[str, LeaseSlot] = {}
        self.last_beat: Beat | None = None
        self.failing = False
        self._wake = trio.Event()

    def __repr__(self) -> str:
        held = sum(slot.held for slot in self.slots.values())
        return f"<Node {self.info.id} holding {held}/{len(self.slots)} lease(s)>"

    def want(self, name: str) -> LeaseSlot:
        """The slot of lease `name`, asked for at the next beat (which comes at once)."""
        slot = self.slots.get(name)
        if slot is None:
            slot = self.slots[name] = LeaseSlot(name)
        self._wake.set()
        return slot

    def unwant(self, name: str) -> None:
        """Stop asking for and renewing lease `name` (it runs out, or `release` lets it go)."""
        self.slots.pop(name, None)

    async def release(self, fence: Fence) -> None:
        """Let one lease go now if it is still held with `fence` (best effort, bounded)."""
        with trio.move_on_after(self.config.database_timeout * 2 + 1) as scope:
            scope.shield = True
            with contextlib.suppress(StoreUnavailable):  # it expires by itself
                await self.coordination.release(self.info.id, fence.name, fence.token)

    @property
    def held(self) -> list[str]:
        return sorted(name for name, slot in self.slots.items() if slot.held)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat every heartbeat until cancelled; `started()` after the first beat was tried."""
        try:
            await self.beat()
            task_status.started()
            while True:
                with trio.move_on_after(self.config.heartbeat):
                    await self._wake.wait()
                    await trio.sleep(0.01)  # slots wanted together are asked for together
                self._wake = trio.Event()
                await self.beat()
        finally:
            with trio.move_on_after(self.config.database_timeout * 2 + 1) as scope:
                scope.shield = True
                with contextlib.suppress(StoreUnavailable):
                    await self.coordination.leave(self.info.id)
                await self.coordination.close()

    async def beat(self) -> Beat | None:
        """One heartbeat: renew, acquire, read control; None when the database could not be reached."""
        now = trio.current_time()
        slots = dict(self.slots)
        held = {name: slot.fence.token for name, slot in slots.items() if slot.fence and slot.held}
        for slot in slots.values():
            if slot.fence is not None and not slot.held:
                slot.lose()  # ran out before this beat
        wanted = [name for name in slots if name not in held]
        try:
            beat = await self.coordination.beat(self.info, held, wanted, self.config.lease_ttl)
        except StoreUnavailable as exc:
            if not self.failing:
                log.warning("cluster heartbeat failed", extra={"fields": {"error": str(exc)}})
            self.failing = True
            return None
        if self.failing:
            log.info("cluster heartbeat recovered", extra={"fields": {"node": self.info.id}})
        self.failing = False
        deadline = now + self.config.lease_ttl - self.config.heartbeat
        for name, token in held.items():
            slot = slots[name]
            if beat.renewed.get(name) == token and slot.fence is not None and slot.fence.token == token:
                slot.extend(deadline)
            else:
                _lost(slot, "taken by another node or expired")
        for name, token in beat.granted.items():
            wanted_now = self.slots.get(name)
            fence = Fence(name, self.info.id, token)
            if wanted_now is None or wanted_now is not slots.get(name):
                await self.release(fence)  # no longer wanted while the beat was under way
                continue
            log.info("lease acquired", extra={"fields": {"lease": name, "token": token}})
            wanted_now.grant(fence, deadline)
        self.last_beat = beat
        if self.on_beat is not None:
            self.on_beat(beat)
        return beat

    def status(self) -> dict[str, Any]:
        return {"id": self.info.id, "held": self.held, "failing": self.failing}


def _lost(slot: LeaseSlot, why: str) -> None:
    if slot.fence is not None:
        log.warning(
            "lease lost", extra={"fields": {"lease": slot.name, "token": slot.fence.token, "why": why}}
        )
    slot.lose()


__all__ = ["LeaseSlot", "Node", "this_node"]


def open_node(config: Config) -> Node | None:
    """This process as a node of the cluster `config` describes, or None for one SQLite node.

    Its id is the one the store claims deliveries under (`daemon.config.root.node_id`).
    """
    store = config.store
    if store.backend != "postgres" or store.url is None:
        return None
    from daemon.store.leases import PostgresCoordination  # psycopg: loaded only in a cluster

    coordination = PostgresCoordination(store.url.value.reveal(), timeout=config.cluster.database_timeout)
    return Node(coordination, this_node(config.listener.address, node_id(config)), config.cluster)
