"""Every node applies the cluster's pauses and drain at its heartbeat (daemon/cluster/control.py)."""

from __future__ import annotations

import trio

from daemon.cluster.control import Follower
from daemon.running import Pauses
from daemon.store.coordination import Beat, Drain


class Actor:
    def __init__(self) -> None:
        self.paused = False
        self.changes = 0

    def pause(self) -> None:
        self.paused, self.changes = True, self.changes + 1

    def resume(self) -> None:
        self.paused, self.changes = False, self.changes + 1


def _beat(paused: frozenset[str] | set[str] = frozenset(), drain: Drain | None = None) -> Beat:
    return Beat({}, {}, frozenset(paused), drain)


def _node() -> tuple[Follower, dict[str, Actor], dict[str, Actor], Pauses, trio.Event]:
    sinks, pollers = {"crm": Actor(), "file": Actor()}, {"orders": Actor()}
    pauses, stop = Pauses(), trio.Event()
    follower = Follower(
        sinks=lambda: sinks, pollers=lambda: pollers, webhooks=lambda: {"hook"}, holds=pauses, stop=stop
    )
    return follower, sinks, pollers, pauses, stop


async def test_the_clusters_pauses_are_applied_and_lifted() -> None:
    follower, sinks, pollers, pauses, _ = _node()
    follower(_beat({"crm", "orders", "hook", "gone"}))
    assert (sinks["crm"].paused, sinks["file"].paused, pollers["orders"].paused) == (True, False, True)
    assert pauses.sources == {"hook"}  # a name no longer configured is ignored
    follower(_beat({"crm", "orders", "hook"}))
    assert sinks["crm"].changes == 1, "an unchanged pause is not applied again"
    follower(_beat())
    assert not any(actor.paused for actor in [*sinks.values(), *pollers.values()])
    assert pauses.sources == set()


async def test_a_drain_stops_intake_then_the_node() -> None:
    follower, sinks, pollers, pauses, stop = _node()
    follower(_beat(drain=Drain(4, active=True, done=False)))
    assert pauses.draining
    assert pollers["orders"].paused
    assert not sinks["crm"].paused, "sinks keep delivering during a drain"
    follower(_beat(drain=Drain(4, active=True, done=False)))
    assert pollers["orders"].paused, "no resume during a drain"
    assert not stop.is_set()
    follower(_beat(drain=Drain(4, active=False, done=True)))
    assert stop.is_set()


async def test_a_drain_that_ended_before_the_node_started_is_ignored() -> None:
    follower, _, pollers, pauses, stop = _node()
    follower(_beat(drain=Drain(3, active=False, done=True)))
    follower(_beat(drain=Drain(3, active=False, done=True)))
    assert not pauses.draining
    assert not pollers["orders"].paused
    assert not stop.is_set()


async def test_a_drain_seen_only_once_it_was_over_still_stops_the_node() -> None:
    follower, _, _, pauses, stop = _node()
    follower(_beat())
    follower(_beat(drain=Drain(1, active=False, done=True)))  # begun and done between two beats
    assert pauses.draining
    assert stop.is_set()


async def test_a_node_started_during_a_drain_joins_it() -> None:
    follower, _, _, pauses, stop = _node()
    follower(_beat(drain=Drain(2, active=True, done=False)))
    assert pauses.draining
    follower(_beat(drain=Drain(2, active=False, done=True)))
    assert stop.is_set()


async def test_a_drain_past_its_deadline_stops_the_nodes_that_joined_it() -> None:
    follower, _, _, _, stop = _node()
    follower(_beat(drain=Drain(5, active=True, done=False)))
    follower(_beat(drain=Drain(5, active=False, done=False)))
    assert stop.is_set()


async def test_every_beat_wakes_the_consumers_for_work_other_nodes_wrote() -> None:
    woken: list[int] = []
    follower = Follower(
        sinks=dict,
        pollers=dict,
        webhooks=set,
        holds=Pauses(),
        stop=trio.Event(),
        wake=lambda: woken.append(1),
    )
    for _ in range(3):
        follower(_beat())
    assert len(woken) == 3
