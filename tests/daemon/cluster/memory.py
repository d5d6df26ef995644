"""An in-memory `Coordination` on trio's clock, for unit tests of the runtime side on a MockClock.

It keeps the contract of `daemon.store.leases.PostgresCoordination` (tested on the real server in
tests/daemon/store/test_leases.py): tokens grow on every acquisition, renewal needs the current
token and an unexpired lease, time is one clock for every node. A node id in `cut` makes that node's calls
fail as an unreachable database does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import trio
import trio.lowlevel

from daemon.errors import StoreUnavailable
from daemon.store.coordination import Beat, Drain, LeaseRow, NodeInfo, NodeRow


class MemoryCoordination:
    def __init__(self) -> None:
        self.leases_: dict[str, tuple[str | None, int, float]] = {}
        self.beats: dict[str, float] = {}
        self.paused: set[str] = set()
        self.drain: Drain | None = None
        self.cut: set[str] = set()
        """Nodes that cannot reach the database."""
        self.metrics: dict[str, tuple[float, bytes]] = {}

    def _check(self, node_id: str) -> None:
        if node_id in self.cut:
            raise StoreUnavailable("database: connection refused")

    async def beat(self, node: NodeInfo, held: Mapping[str, int], wanted: Sequence[str], ttl: float) -> Beat:
        self._check(node.id)
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self.beats[node.id] = now
        renewed = {}
        for name, token in held.items():
            holder, current, expires = self.leases_.get(name, (None, 0, 0.0))
            if holder == node.id and current == token and expires > now:
                self.leases_[name] = (holder, token, now + ttl)
                renewed[name] = token
        granted = {}
        for name in wanted:
            if name in held:
                continue
            holder, token, expires = self.leases_.get(name, (None, 0, 0.0))
            if holder is None or expires <= now or holder == node.id:
                self.leases_[name] = (node.id, token + 1, now + ttl)
                granted[name] = token + 1
        return Beat(granted, renewed, frozenset(self.paused), self.drain)

    async def release(self, node_id: str, name: str, token: int) -> None:
        self._check(node_id)
        holder, current, _expires = self.leases_.get(name, (None, 0, 0.0))
        if holder == node_id and current == token:
            self.leases_[name] = (holder, token, trio.current_time())

    async def nodes(self, dead_after: float) -> list[NodeRow]:
        return []

    async def leases(self) -> list[LeaseRow]:
        now = trio.current_time()
        return [LeaseRow(name, h, t, e - now) for name, (h, t, e) in sorted(self.leases_.items())]

    async def set_paused(self, name: str, paused: bool, node_id: str) -> bool:
        self._check(node_id)
        changed = (name in self.paused) != paused
        (self.paused.add if paused else self.paused.discard)(name)
        return changed

    async def start_drain(self, node_id: str, timeout: float) -> Drain:
        self._check(node_id)
        self.drain = Drain((self.drain.number if self.drain else 0) + 1, active=True, done=False)
        return self.drain

    async def finish_drain(self, number: int) -> None:
        self.drain = Drain(number, active=False, done=True)

    async def leave(self, node_id: str) -> None:
        self._check(node_id)
        now = trio.current_time()
        for name, (holder, token, expires) in list(self.leases_.items()):
            if holder == node_id and expires > now:
                self.leases_[name] = (holder, token, now)

    async def publish_metrics(self, node_id: str, snapshot: bytes) -> None:
        self._check(node_id)
        await trio.lowlevel.checkpoint()
        self.metrics[node_id] = (trio.current_time(), snapshot)

    async def cluster_metrics(self, max_age: float) -> dict[str, bytes]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        return {node: blob for node, (at, blob) in self.metrics.items() if at >= now - max_age}

    async def close(self) -> None:
        pass

    def holder(self, name: str) -> tuple[str | None, int]:
        holder, token, expires = self.leases_.get(name, (None, 0, 0.0))
        return (holder if expires > trio.current_time() else None), token
