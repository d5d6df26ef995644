"""The aggregator against a real store on disk, its windows timed by trio's MockClock (moved by hand)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.transform.aggregator import Aggregator
from actors.transform.config import AggregateConfig, RouteConfig, TransformConfig
from daemon.config.units import Duration
from daemon.store import outbox
from daemon.store.schema import DEAD
from daemon.store.sqlite import Connection, Store
from daemon.store.windows import Joined, Window, commit_joined

NAME = "totals"
REDUCE = "{category: .[0].category, count: length, total: (map(.amount) | add)}"


def make(store: Store, clock: Callable[[], float] | None = None, **aggregate: Any) -> Aggregator:
    fields: dict[str, Any] = {"key": ".category", "reduce": REDUCE} | aggregate
    routes = fields.pop("routes", [])
    default_route = fields.pop("default_route", None)
    config = TransformConfig(
        inputs=["sales"], aggregate=AggregateConfig(**fields), routes=routes, default_route=default_route
    )
    wall = clock if clock is not None else (lambda: 1.7e9 + trio.current_time())
    return Aggregator(
        NAME, config, store, sinks=["report", "alerts"], transforms=[], batch_size=3, clock=wall
    )


async def ingest(store: Store, *events: Any) -> list[str]:
    ids = []
    for event in events:
        event_id, _ = await store.call(
            partial(
                outbox.insert_event, stream="sales", payload=json.dumps(event).encode(), trace=None, sinks=[]
            ),
            wake=[NAME],
        )
        ids.append(event_id)
    return ids


async def until(store: Store, check: Callable[[Connection], bool]) -> None:
    """Re-read the store until `check` holds. Each read is a real round trip to the writer thread;
    the mock clock does not move meanwhile, so the bound is a number of reads, not a time."""
    for _ in range(2000):
        if await store.call(check):
            return
        await trio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


def emitted(conn: Connection) -> list[tuple[str, Any]]:
    rows = conn.execute("SELECT id, payload FROM events WHERE stream = ? ORDER BY seq", (NAME,)).fetchall()
    return [(id_, json.loads(payload)) for id_, payload in rows]


def joined(count: int) -> Callable[[Connection], bool]:
    return lambda conn: conn.execute("SELECT count(*) FROM window_events").fetchone()[0] == count


def sales(category: str, *amounts: int) -> list[dict[str, Any]]:
    return [{"category": category, "amount": amount} for amount in amounts]


async def test_count_closes_windows_per_group(store: Store) -> None:
    aggregator = make(store, max_events=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        ids = await ingest(store, *sales("books", 1, 2), *sales("games", 10), *sales("books", 3, 4, 5, 6))
        await until(store, lambda conn: len(emitted(conn)) == 2)
        nursery.cancel_scope.cancel()

    # books: [1, 2, 3] and [4, 5, 6]; games still open with one event.
    assert await store.call(emitted) == [
        (f"{ids[0]}.totals", {"category": "books", "count": 3, "total": 6}),
        (f"{ids[4]}.totals", {"category": "books", "count": 3, "total": 15}),
    ]
    deliveries = await store.call(lambda conn: conn.execute("SELECT id FROM deliveries").fetchall())
    assert sorted(d for (d,) in deliveries) == sorted(
        f"{ids[i]}.totals.{sink}" for i in (0, 4) for sink in ("report", "alerts")
    )
    left = await store.call(lambda conn: conn.execute("SELECT key, size FROM windows").fetchall())
    assert left == [('"games"', 1)]
    assert repr(aggregator) == (
        "<Aggregator totals [in: 7, open windows: 1, emitted: 2, dropped: 0, dead: 0]>"
    )


async def test_age_closes_a_window_exactly_at_its_deadline(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    aggregator = make(store, max_age=Duration(10))
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        [first, *_] = await ingest(store, *sales("books", 1, 2))
        await until(store, joined(2))
        mock_clock.jump(6)
        [games] = await ingest(store, *sales("games", 7))  # its window opens 6 s later
        await until(store, joined(3))

        mock_clock.jump(3.999)  # 9.999 s: nothing is due
        await trio.testing.wait_all_tasks_blocked()
        assert await store.call(emitted) == []

        mock_clock.jump(0.001)  # 10 s: books closes, games (opened at 6 s) does not
        await until(store, lambda conn: len(emitted(conn)) == 1)
        await ingest(store, *sales("books", 100))  # opens a new books window
        await until(store, joined(2))
        await trio.testing.wait_all_tasks_blocked()
        assert await store.call(emitted) == [
            (f"{first}.totals", {"category": "books", "count": 2, "total": 3})
        ]

        mock_clock.jump(6)  # 16 s: games closes; the new books window has 4 s left
        await until(store, lambda conn: len(emitted(conn)) == 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert [payload for _, payload in await store.call(emitted)] == [
        {"category": "books", "count": 2, "total": 3},
        {"category": "games", "count": 1, "total": 7},
    ]
    assert (await store.call(emitted))[1][0] == f"{games}.totals"


async def test_a_restart_keeps_windows_and_their_age(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    first = make(store, max_events=3, max_age=Duration(60))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        ids = await ingest(store, *sales("books", 1, 2), *sales("games", 5))
        await until(store, joined(3))
        nursery.cancel_scope.cancel()

    second = make(store, max_events=3, max_age=Duration(60))  # a new process: state from the store
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await ingest(store, *sales("books", 3))  # fills the books window opened before the restart
        await until(store, lambda conn: len(emitted(conn)) == 1)
        mock_clock.jump(61)  # games' window (opened before the restart) is past its age
        await until(store, lambda conn: len(emitted(conn)) == 2)
        nursery.cancel_scope.cancel()

    assert await store.call(emitted) == [
        (f"{ids[0]}.totals", {"category": "books", "count": 3, "total": 6}),
        (f"{ids[2]}.totals", {"category": "games", "count": 1, "total": 5}),
    ]
    assert await store.call(lambda conn: conn.execute("SELECT count(*) FROM windows").fetchone()[0]) == 0


async def test_the_time_a_daemon_was_down_counts_toward_a_window_age(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """A window's opening is stored on the wall clock: after 50 s down (the wall clock moved, trio's
    clock of the new process starts afresh), a 60 s window has 10 s left, not 60."""
    wall = [1.7e9]
    first = make(store, lambda: wall[0], max_age=Duration(60))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await ingest(store, *sales("books", 1))
        await until(store, joined(1))
        nursery.cancel_scope.cancel()

    wall[0] += 50  # down for 50 s
    second = make(store, lambda: wall[0] + trio.current_time() - started, max_age=Duration(60))
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        mock_clock.jump(9.9)
        await trio.testing.wait_all_tasks_blocked()
        assert await store.call(emitted) == []
        mock_clock.jump(0.1)  # 60 s after the window opened, 10 s into this incarnation
        await until(store, lambda conn: len(emitted(conn)) == 1)
        nursery.cancel_scope.cancel()


async def test_a_window_closed_before_a_crash_is_emitted_once_at_start(store: Store) -> None:
    # Commit 1 happened (the window is full), commit 2 did not: what a kill -9 between them leaves.
    [parent] = await ingest(store, {"category": "books", "amount": 0})
    rows = [
        Joined(1, n, f"{parent}.totals" + (f".{n}" if n else ""), b'{"category":"books","amount":4}', None)
        for n in range(2)
    ]
    await store.call(
        partial(
            commit_joined,
            transform=NAME,
            position=1,
            joined=rows,
            windows=[Window(1, '"books"', 0.0, None, 2)],
            failures=[],
        )
    )
    aggregator = make(store, max_events=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        await until(store, lambda conn: len(emitted(conn)) == 1)
        nursery.cancel_scope.cancel()
    again = make(store, max_events=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert await store.call(emitted) == [(f"{parent}.totals", {"category": "books", "count": 2, "total": 8})]


async def test_bad_events_and_a_failing_reduce_are_dead_lettered(store: Store) -> None:
    aggregator = make(store, max_events=2, reduce='map(.amount) | add | if . > 100 then error("too big") end')
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        [_, ok1, _, big1, _] = await ingest(
            store,
            {"amount": 1, "category": {"nested": True}},  # any JSON value is a key
            *sales("a", 1, 2),
            *sales("b", 99, 2),
        )
        await until(store, lambda conn: len(emitted(conn)) == 1)
        await until(
            store,
            lambda conn: conn.execute("SELECT count(*) FROM deliveries WHERE state = 2").fetchone()[0] == 1,
        )
        nursery.cancel_scope.cancel()

    assert await store.call(emitted) == [(f"{ok1}.totals", 3)]
    [(letter, stage, state, error, stream, payload)] = await store.call(
        lambda conn: conn.execute(
            "SELECT d.id, d.stage, d.state, d.last_error, e.stream, e.payload FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq WHERE d.state = 2"
        ).fetchall()
    )
    assert (letter, stage, state, stream) == (f"{big1}.totals.totals", NAME, DEAD, "totals/windows")
    assert error.startswith("jq: ")
    assert "too big" in error
    assert json.loads(payload) == sales("b", 99, 2)  # what the window held
    open_windows = await store.call(lambda conn: conn.execute("SELECT key, size FROM windows").fetchall())
    assert open_windows == [('{"nested":true}', 1)]
    assert aggregator.failed == 1


async def test_a_key_error_dead_letters_the_event(store: Store) -> None:
    aggregator = make(store, key=".category | ascii_downcase", max_events=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        [bad, good] = await ingest(store, {"category": 7, "amount": 1}, *sales("A", 1))
        await until(store, lambda conn: len(emitted(conn)) == 1)
        nursery.cancel_scope.cancel()
    dead = await store.call(
        lambda conn: conn.execute("SELECT id, last_error FROM deliveries WHERE state = 2").fetchall()
    )
    assert [id_ for id_, _ in dead] == [f"{bad}.totals"]
    assert dead[0][1].startswith("jq: ")
    assert [id_ for id_, _ in await store.call(emitted)] == [f"{good}.totals"]


async def test_the_emitted_event_is_routed(store: Store) -> None:
    aggregator = make(
        store,
        max_events=2,
        routes=[RouteConfig(when=".total > 10", to=["alerts"])],
        default_route=["report"],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        [small, _, big, _] = await ingest(store, *sales("a", 1, 2), *sales("b", 9, 9))
        await until(store, lambda conn: len(emitted(conn)) == 2)
        nursery.cancel_scope.cancel()
    deliveries = await store.call(lambda conn: conn.execute("SELECT id FROM deliveries").fetchall())
    assert sorted(d for (d,) in deliveries) == sorted([f"{small}.totals.report", f"{big}.totals.alerts"])


async def test_a_batch_whose_traces_are_all_unsampled_gets_no_span(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr("daemon.telemetry.otel.tracer", lambda: provider.get_tracer("test"))
    aggregator = make(store, max_events=100)
    traces = [UNSAMPLED, UNSAMPLED, UNSAMPLED, SAMPLED]  # batches of 3: unsampled only, then one sampled
    payload = json.dumps({"category": "books", "amount": 1}).encode()
    for trace in traces:  # stored before the aggregator reads, so its batches are as above
        await store.call(partial(outbox.insert_event, stream="sales", payload=payload, trace=trace, sinks=[]))
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregator.run)
        await until(store, joined(4))
        nursery.cancel_scope.cancel()
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["aggregator join"]  # the sampled event's batch only
    assert spans[0].parent is not None
    assert spans[0].parent.trace_id == int(SAMPLED.split("-")[1], 16)


UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
