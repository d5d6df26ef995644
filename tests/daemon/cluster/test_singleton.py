"""A singleton runs on one node at a time, stops when its lease goes, fails over within the bound.

Nodes here share an in-memory coordination on trio's MockClock (the PostgreSQL one is tested on
the real server in tests/daemon/store/test_leases.py, and end to end in tests/e2e/test_cluster.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from daemon.cluster.node import Node
from daemon.cluster.singleton import Singleton, only_lease_lost
from daemon.config.sections import ClusterConfig
from daemon.config.units import Duration
from daemon.errors import LeaseLost
from daemon.store import fencing
from daemon.store.coordination import NodeInfo
from daemon.store.fencing import Fence
from tests.daemon.cluster.memory import MemoryCoordination

CONFIG = ClusterConfig(heartbeat=Duration(1), lease_ttl=Duration(5))


class Recorder:
    """An actor that records who runs it, when, and under which fence; fails on cue."""

    def __init__(self, log: list[tuple[str, str, float, Fence | None]], node: str) -> None:
        self.log, self.node = log, node
        self.running = 0
        self.fail: BaseException | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self.log.append(("start", self.node, trio.current_time(), fencing.current()))
        self.running += 1
        try:
            async with trio.open_nursery() as nursery:  # a child task sees the fence too
                nursery.start_soon(self._child)
                while True:
                    await trio.sleep(0.25)
                    if self.fail is not None:
                        failure, self.fail = self.fail, None
                        raise failure
        finally:
            self.running -= 1
            self.log.append(("stop", self.node, trio.current_time(), None))

    async def _child(self) -> None:
        assert fencing.current() is not None
        await trio.sleep_forever()


class Cluster:
    """N nodes, each with its heartbeat loop and one Singleton of lease `L`, in one nursery."""

    def __init__(self, nursery: trio.Nursery, coordination: MemoryCoordination) -> None:
        self.nursery, self.coordination = nursery, coordination
        self.log: list[tuple[str, str, float, Fence | None]] = []
        self.scopes: dict[str, trio.CancelScope] = {}
        self.actors: dict[str, Recorder] = {}
        self.singletons: dict[str, Singleton] = {}

    async def start(self, name: str) -> None:
        node = Node(self.coordination, NodeInfo(name, "host", "127.0.0.1:1", 1), CONFIG)
        actor = self.actors[name] = Recorder(self.log, name)
        singleton = self.singletons[name] = Singleton("L", actor, node)
        scope = self.scopes[name] = trio.CancelScope()

        async def life(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(node.run)
                    await inner.start(singleton.run)
                    task_status.started()

        await self.nursery.start(life)

    def running(self) -> list[str]:
        return [name for name, actor in self.actors.items() if actor.running]

    async def until_running(self, *, exclude: str | None = None, within: float = 30) -> str:
        with trio.fail_after(within):
            while True:
                running = [name for name in self.running() if name != exclude]
                if running:
                    return running[0]
                await trio.sleep(0.05)


@asynccontextmanager
async def cluster_of(*names: str) -> AsyncIterator[Cluster]:
    """Nodes `names` running lease `L`, watched for overlap (a failure ends the test), until exit."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, MemoryCoordination())
        nursery.start_soon(_watch_overlap, cluster)
        for name in names:
            await cluster.start(name)
        yield cluster
        nursery.cancel_scope.cancel()


async def _watch_overlap(cluster: Cluster) -> None:
    while True:
        assert len(cluster.running()) <= 1, f"two nodes ran the singleton at once: {cluster.running()}"
        await trio.sleep(0.01)


async def test_one_node_runs_the_singleton_under_its_fence(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster_of("a", "b", "c") as cluster:
        leader = await cluster.until_running()
        await trio.sleep(30)  # many renewals later, still the same single leader
        assert cluster.running() == [leader]
        (start,) = [entry for entry in cluster.log if entry[0] == "start"]
        assert start[3] == Fence("L", leader, 1)
        assert {s.role for n, s in cluster.singletons.items() if n != leader} == {"standby"}


async def test_a_dead_node_fails_over_within_lease_ttl_plus_a_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of("a", "b") as cluster:
        coordination = cluster.coordination
        leader = await cluster.until_running()
        coordination.cut.add(leader)  # kill -9: no more heartbeats, no clean release
        cluster.scopes[leader].cancel()
        died = trio.current_time()
        successor = await cluster.until_running(exclude=leader)
        assert trio.current_time() - died <= CONFIG.lease_ttl + CONFIG.heartbeat + 0.1
        starts = [entry for entry in cluster.log if entry[0] == "start"]
        assert starts[-1][3] == Fence("L", successor, 2)


async def test_a_node_cut_off_stops_its_singleton_before_another_takes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of("a", "b") as cluster:
        coordination = cluster.coordination
        leader = await cluster.until_running()
        coordination.cut.add(leader)  # alive, but cannot renew
        successor = await cluster.until_running(exclude=leader)
        stops = [entry for entry in cluster.log if entry[0] == "stop" and entry[1] == leader]
        starts = [entry for entry in cluster.log if entry[0] == "start" and entry[1] == successor]
        assert stops
        assert stops[0][2] < starts[0][2]
        coordination.cut.clear()  # back: the old leader stays standby, the new one keeps it
        await trio.sleep(20)
        assert cluster.running() == [successor]


async def test_a_clean_stop_hands_the_lease_over_at_the_next_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of("a", "b") as cluster:
        leader = await cluster.until_running()
        cluster.scopes[leader].cancel()
        stopped = trio.current_time()
        await cluster.until_running(exclude=leader)
        assert trio.current_time() - stopped <= CONFIG.heartbeat + 0.1


async def test_a_refused_commit_stops_the_actor_and_the_lease_is_taken_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster_of("a") as cluster:
        await cluster.until_running()
        cluster.actors["a"].fail = LeaseLost("lease 'L' (token 1) is no longer held by a")
        with trio.fail_after(10):
            while len([e for e in cluster.log if e[0] == "start"]) < 2:
                await trio.sleep(0.05)
        assert [e[3] for e in cluster.log if e[0] == "start"][-1] == Fence("L", "a", 2)
        assert cluster.singletons["a"].acquisitions == 2


async def test_an_actor_crash_is_the_supervisors_business(autojump_clock: trio.testing.MockClock) -> None:
    coordination = MemoryCoordination()
    node = Node(coordination, NodeInfo("a", "host", "127.0.0.1:1", 1), CONFIG)
    actor = Recorder([], "a")
    actor.fail = RuntimeError("boom")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with pytest.raises(ExceptionGroup) as caught:  # the supervisor counts it and restarts the wrapper
            await Singleton("L", actor, node).run()
        nursery.cancel_scope.cancel()
    assert [type(e) for e in _leaves(caught.value)] == [RuntimeError]
    assert coordination.holder("L") == (None, 1), "the lease is let go when the actor ends"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def test_only_lease_lost_looks_inside_groups() -> None:
    lost = LeaseLost("x")
    assert only_lease_lost(lost)
    assert only_lease_lost(BaseExceptionGroup("", [ExceptionGroup("", [lost])]))
    assert not only_lease_lost(ExceptionGroup("", [lost, ValueError()]))
    assert not only_lease_lost(ValueError())
