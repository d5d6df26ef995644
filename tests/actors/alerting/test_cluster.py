"""The cluster's metrics merged for the alerter: sums that never go down, gauges' highest, bad input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from actors.alerting.cluster import ClusterMetrics, cluster_view, decode, encode, publish_forever
from actors.alerting.expr import HistPoint, Reading, Snapshot, Tracker, parse_expr
from daemon.errors import StoreUnavailable
from daemon.telemetry import metrics

KINDS = metrics.catalogue()
# A `Snapshot` that is a dict, so that tests can join two with `|` (a Mapping has no `|`).
SnapshotDict = dict[str, list[tuple[Mapping[str, Any], Reading]]]


def dead(count: float, stage: str = "crm") -> SnapshotDict:
    return {"ferry.dead_letters": [({"stage": stage}, count)]}


def read(snapshot: Snapshot, name: str) -> list[tuple[dict[str, str], object]]:
    return [(dict(attributes), value) for attributes, value in snapshot.get(name, [])]


def test_counters_are_summed_over_the_nodes_series_by_series() -> None:
    merged = ClusterMetrics(KINDS).merge(
        {"a": dead(3) | {"ferry.events.received": [({"source": "demo"}, 5.0)]}, "b": dead(4)}
    )
    assert read(merged, "ferry.dead_letters") == [({"stage": "crm"}, 7.0)]
    assert read(merged, "ferry.events.received") == [({"source": "demo"}, 5.0)]


def test_a_node_restarting_does_not_make_the_cluster_total_go_down_or_count_twice() -> None:
    view = ClusterMetrics(KINDS)
    assert read(view.merge({"a": dead(10), "b": dead(20)}), "ferry.dead_letters")[0][1] == 30.0
    # node b restarted: its own count starts again from 0 and reaches 2.
    assert read(view.merge({"a": dead(11), "b": dead(2)}), "ferry.dead_letters")[0][1] == 33.0
    assert read(view.merge({"a": dead(11), "b": dead(5)}), "ferry.dead_letters")[0][1] == 36.0
    # A rule's increase sees 6 new dead letters, not a reset that counts the cluster's 36 again.
    tracker = Tracker(parse_expr("increase(dead_letters, 1h)", KINDS))
    view = ClusterMetrics(KINDS)
    values = [
        tracker.observe(view.merge(nodes), now)
        for now, nodes in enumerate(
            [{"a": dead(10), "b": dead(20)}, {"a": dead(11), "b": dead(2)}, {"a": dead(11), "b": dead(5)}]
        )
    ]
    assert values == [None, 3.0, 6.0]


def test_a_node_that_stops_publishing_keeps_its_last_totals() -> None:
    view = ClusterMetrics(KINDS)
    view.merge({"a": dead(10), "b": dead(20)})
    assert read(view.merge({"a": dead(12)}), "ferry.dead_letters")[0][1] == 32.0


def test_gauges_take_the_highest_node_not_the_sum() -> None:
    depth = "ferry.queue.depth"
    merged = ClusterMetrics(KINDS).merge(
        {
            "a": {depth: [({"stage": "crm"}, 40.0)], "ferry.breaker.state": [({"sink": "crm"}, 0.0)]},
            "b": {depth: [({"stage": "crm"}, 40.0)], "ferry.breaker.state": [({"sink": "crm"}, 2.0)]},
        }
    )
    assert read(merged, depth) == [({"stage": "crm"}, 40.0)], "one shared queue, not two"
    assert read(merged, "ferry.breaker.state") == [({"sink": "crm"}, 2.0)], "any node's open breaker"


def test_histograms_add_bucket_by_bucket_and_survive_a_restart() -> None:
    name = "ferry.delivery.duration"

    def hist(counts: tuple[int, ...], total: float) -> Snapshot:
        return {name: [({"sink": "crm"}, HistPoint((0.1, 1.0), counts, sum(counts), total))]}

    view = ClusterMetrics(KINDS)
    view.merge({"a": hist((1, 2, 0), 1.5), "b": hist((3, 0, 1), 2.5)})
    merged = view.merge({"a": hist((1, 2, 0), 1.5), "b": hist((1, 0, 0), 0.05)})  # b restarted
    ((_, point),) = read(merged, name)
    assert point == HistPoint((0.1, 1.0), (5, 2, 1), 8, 4.05)


def test_a_snapshot_travels_encoded_and_bad_bytes_are_refused_with_a_reason() -> None:
    snapshot: Snapshot = dead(3) | {
        "ferry.delivery.duration": [({"sink": "crm"}, HistPoint((0.1,), (1, 2), 3, 0.7))]
    }
    assert decode(encode(snapshot)) == snapshot
    for bad in (b"", b"not json", b"[]", b'{"x": [[{"a": "b"}, null, {"bounds": [1], "counts": [1]}]]}'):
        with pytest.raises(ValueError, match=r"not a metrics snapshot|histogram"):
            decode(bad)
    with pytest.raises(ValueError, match="one count more"):
        decode(b'{"x": [[{}, null, [[1.0], [1], 1, 0.5]]]}')


def test_a_node_whose_snapshot_is_garbage_is_skipped_and_the_others_still_merge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    view = ClusterMetrics(KINDS)
    merged = view.merge({"a": encode(dead(2)), "b": b"\x00garbage"})
    assert read(merged, "ferry.dead_letters") == [({"stage": "crm"}, 2.0)]
    assert "a node's metrics were skipped" in caplog.text


async def test_the_alerters_view_adds_the_published_nodes_to_its_own() -> None:
    published = {"b": encode(dead(4)), "a": encode(dead(999))}  # its own row: the fresh local wins

    async def read_published(max_age: float) -> dict[str, bytes]:
        assert max_age == 3 * 15.0
        return published

    merged = await cluster_view(read_published, "a", 15.0)(dead(1))
    assert read(merged, "ferry.dead_letters") == [({"stage": "crm"}, 5.0)]

    async def unreachable(max_age: float) -> dict[str, bytes]:
        raise StoreUnavailable("database 127.0.0.1:5432/ferry: connection refused")

    merged = await cluster_view(unreachable, "a", 15.0)(dead(1))
    assert read(merged, "ferry.dead_letters") == [({"stage": "crm"}, 1.0)]


async def test_publishing_runs_every_interval_only_while_rules_exist_and_outlives_an_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[tuple[float, bytes]] = []
    rules = True
    down = False

    async def publish(blob: bytes) -> None:
        if down:
            raise StoreUnavailable("down")
        sent.append((trio.current_time(), blob))

    def collect() -> Snapshot | None:
        return dead(1) if rules else None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_forever, publish, collect, lambda: 10.0)
        await trio.sleep(25)
        assert [at for at, _ in sent] == [0.0, 10.0, 20.0]
        rules = False
        await trio.sleep(20)
        assert len(sent) == 3
        rules, down = True, True
        await trio.sleep(20)
        assert len(sent) == 3
        down = False
        await trio.sleep(10)
        assert len(sent) == 4
        assert decode(sent[-1][1]) == dead(1)
        nursery.cancel_scope.cancel()
