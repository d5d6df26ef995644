"""The transformer against a real store on disk: jq applied, drops counted, bad events dead-lettered."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
import trio.testing

from actors.transform.config import RouteConfig, TransformConfig
from actors.transform.transformer import Transformer
from daemon.store import outbox
from daemon.store.schema import DEAD, PENDING
from daemon.store.sqlite import Connection, Store
from daemon.telemetry.tap import Record, Taps

NAME = "shape"


async def ingest(
    store: Store, *payloads: Any, raw: bytes | None = None, trace: str | None = None
) -> list[str]:
    """Commit events on stream `demo` the way the webhook does, waking the transformer."""
    bodies = [json.dumps(p).encode() for p in payloads] if raw is None else [raw]
    ids = []
    for body in bodies:
        event_id, _ = await store.call(
            partial(outbox.insert_event, stream="demo", payload=body, trace=trace, sinks=[]), wake=[NAME]
        )
        ids.append(event_id)
    return ids


async def until(store: Store, check: Callable[[Connection], bool]) -> None:
    """Wait until `check` holds in the store, re-checking each time the transformer wakes its sink."""
    downstream = store.signal("crm")
    with trio.fail_after(5):
        while not await store.call(check):
            await downstream.wait()


def caught_up(conn: Connection) -> bool:
    last = conn.execute("SELECT max(seq) FROM events WHERE stream = 'demo'").fetchone()[0]
    return bool(outbox.cursor(conn, NAME) == last)


def outputs(conn: Connection) -> list[tuple[str, Any, str | None]]:
    rows = conn.execute("SELECT id, payload, trace FROM events WHERE stream = ? ORDER BY seq", (NAME,))
    return [(event_id, json.loads(payload), trace) for event_id, payload, trace in rows.fetchall()]


def make(store: Store, map: str = ".", filter: str | None = None) -> Transformer:
    config = TransformConfig(inputs=["demo"], map=map, filter=filter)
    return Transformer(NAME, config, store, sinks=["crm"], transforms=[], batch_size=2)


async def test_map_is_applied_and_each_output_gets_a_delivery(store: Store) -> None:
    transformer = make(store, map='{id: .id, name: (.first + " " + .last)}')
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        ids = await ingest(
            store,
            {"id": 1, "first": "Ada", "last": "Lovelace"},
            {"id": 2, "first": "Alan", "last": "Turing"},
            {"id": 3, "first": "Grace", "last": "Hopper"},
            trace="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    found = await store.call(outputs)
    assert [(event_id, payload) for event_id, payload, _ in found] == [
        (f"{ids[0]}.shape", {"id": 1, "name": "Ada Lovelace"}),
        (f"{ids[1]}.shape", {"id": 2, "name": "Alan Turing"}),
        (f"{ids[2]}.shape", {"id": 3, "name": "Grace Hopper"}),
    ]
    assert {trace for _, _, trace in found} == {"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    deliveries = await store.call(
        lambda conn: conn.execute("SELECT id, stage, state FROM deliveries ORDER BY rowid").fetchall()
    )
    assert deliveries == [(f"{event_id}.crm", "crm", PENDING) for event_id, _, _ in found]
    assert (transformer.transformed, transformer.dropped, transformer.failed) == (3, 0, 0)


async def test_filter_drops_events_and_counts_them(store: Store) -> None:
    transformer = make(store, map=".n", filter=".keep")
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        await ingest(
            store, {"n": 1, "keep": True}, {"n": 2, "keep": False}, {"n": 3}, {"n": 4, "keep": "yes"}
        )
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [payload for _, payload, _ in await store.call(outputs)] == [1, 4]
    assert transformer.dropped == 2
    assert transformer.failed == 0
    assert repr(transformer) == "<Transformer shape [in: 4, dropped: 2, dead: 0]>"


async def test_several_outputs_get_derived_ids(store: Store) -> None:
    transformer = make(store, map=".items[]")
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        [many, none, one] = await ingest(store, {"items": ["a", "b", "c"]}, {"items": []}, {"items": ["z"]})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [(event_id, payload) for event_id, payload, _ in await store.call(outputs)] == [
        (f"{many}.shape", "a"),
        (f"{many}.shape.1", "b"),
        (f"{many}.shape.2", "c"),
        (f"{one}.shape", "z"),
    ]
    assert none not in {event_id.split(".")[0] for event_id, _, _ in await store.call(outputs)}
    assert transformer.dropped == 1


async def test_jq_error_dead_letters_only_that_event(store: Store) -> None:
    transformer = make(store, map=".a + 1")
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        [first, bad, last] = await ingest(store, {"a": 1}, {"a": "text"}, {"a": 2})
        [garbage] = await ingest(store, raw=b"{not json")
        [after] = await ingest(store, {"a": 41})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [(event_id, payload) for event_id, payload, _ in await store.call(outputs)] == [
        (f"{first}.shape", 2),
        (f"{last}.shape", 3),
        (f"{after}.shape", 42),
    ]
    dead = await store.call(
        lambda conn: conn.execute(
            "SELECT d.id, e.id, d.stage, d.state, d.attempts, d.last_error FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq WHERE d.stage = ? ORDER BY d.rowid",
            (NAME,),
        ).fetchall()
    )
    assert [row[:5] for row in dead] == [
        (f"{bad}.shape", bad, NAME, DEAD, 1),
        (f"{garbage}.shape", garbage, NAME, DEAD, 1),
    ]
    assert dead[0][5].startswith("jq: ")
    assert 'string ("text") and number (1) cannot be added' in dead[0][5]
    assert dead[1][5].startswith("jq: ")
    assert transformer.failed == 2
    assert transformer.transformed == 5


async def test_filter_error_dead_letters_the_event(store: Store) -> None:
    transformer = make(store, filter=".n > (.limit | tonumber)")
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        [bad] = await ingest(store, {"n": 1, "limit": "many"})
        [good] = await ingest(store, {"n": 5, "limit": "3"})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [event_id for event_id, _, _ in await store.call(outputs)] == [f"{good}.shape"]
    states = await store.call(
        lambda conn: conn.execute("SELECT id, state FROM deliveries WHERE stage = ?", (NAME,)).fetchall()
    )
    assert states == [(f"{bad}.shape", DEAD)]


async def test_restart_resumes_from_the_cursor(store: Store) -> None:
    first = make(store, map=".n * 10")
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await ingest(store, {"n": 1}, {"n": 2}, {"n": 3})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    await ingest(store, {"n": 4}, {"n": 5})  # committed while no transformer runs

    second = make(store, map=".n * 10")
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    found = await store.call(outputs)
    assert [payload for _, payload, _ in found] == [10, 20, 30, 40, 50]
    assert len({event_id for event_id, _, _ in found}) == 5
    assert (first.transformed, second.transformed) == (3, 2)
    assert await store.call(partial(outbox.counts)) == {"crm": {"pending": 5, "delivered": 0, "dead": 0}}


async def test_reads_only_its_inputs(store: Store) -> None:
    transformer = make(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        await store.call(
            partial(outbox.insert_event, stream="elsewhere", payload=b"{}", trace=None, sinks=[]), wake=[NAME]
        )
        [mine] = await ingest(store, {"x": 1})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [event_id for event_id, _, _ in await store.call(outputs)] == [f"{mine}.shape"]


async def test_invalid_events_are_dead_lettered_with_every_violation(store: Store) -> None:
    schema = {"type": "object", "required": ["email"], "properties": {"email": {"format": "email"}}}
    config = TransformConfig(inputs=["demo"], map="{email}", schema=schema)
    transformer = Transformer(NAME, config, store, sinks=["crm"], transforms=[])
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        [good, bad, worse] = await ingest(store, {"email": "a@b.c"}, {"email": "nope"}, [1])
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [event_id for event_id, _, _ in await store.call(outputs)] == [f"{good}.shape"]
    dead = await store.call(
        lambda conn: conn.execute(
            "SELECT id, state, last_error FROM deliveries WHERE stage = ? ORDER BY rowid", (NAME,)
        ).fetchall()
    )
    assert dead == [
        (f"{bad}.shape", DEAD, "schema: 1 violation(s): $.email: 'nope' is not a 'email'"),
        (f"{worse}.shape", DEAD, "schema: 1 violation(s): $: [1] is not of type 'object'"),
    ]
    assert transformer.failed == 2


async def test_routes_create_deliveries_only_for_their_sinks(store: Store) -> None:
    config = TransformConfig(
        inputs=["demo"],
        routes=[RouteConfig(when='.type == "lead"', to=["crm"]), RouteConfig(when=".vip", to=["crm", "vip"])],
    )
    transformer = Transformer(NAME, config, store, sinks=["crm", "vip"], transforms=[])
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        [lead, vip, nobody] = await ingest(store, {"type": "lead"}, {"vip": True}, {"type": "other"})
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    deliveries = await store.call(
        lambda conn: conn.execute("SELECT id, stage FROM deliveries ORDER BY rowid").fetchall()
    )
    assert deliveries == [
        (f"{lead}.shape.crm", "crm"),
        (f"{vip}.shape.crm", "crm"),
        (f"{vip}.shape.vip", "vip"),
    ]
    # An output no route takes is still an event of the stream (transforms reading it see it).
    assert [event_id for event_id, _, _ in await store.call(outputs)] == [
        f"{lead}.shape",
        f"{vip}.shape",
        f"{nobody}.shape",
    ]
    assert transformer.unrouted == 1
    assert repr(transformer) == "<Transformer shape [in: 3, dropped: 0, dead: 0, unrouted: 1]>"


async def test_tap_records_are_stamped_by_the_injected_clock(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """What the transformer stamps reads its clock: on a `MockClock` moved 42 s, a wall clock of
    `1_000_000 + trio.current_time()` stamps exactly 1_000_042, whatever real time it is."""
    taps = Taps()
    transformer = Transformer(
        NAME,
        TransformConfig(inputs=["demo"], map="{n: .n}"),
        store,
        sinks=["crm"],
        transforms=[],
        clock=lambda: 1_000_000.0 + trio.current_time(),
        taps=taps,
    )
    mock_clock.jump(42)
    records: list[Record] = []
    with taps.subscribe(NAME) as tap:
        async with trio.open_nursery() as nursery:
            await nursery.start(transformer.run)
            await ingest(store, {"n": 1})
            deadline = time.monotonic() + 10  # real time: the mock clock only moves on a jump
            while not records:
                assert time.monotonic() < deadline, "no tap record in real time"
                try:
                    records.append(tap.receive.receive_nowait())
                except trio.WouldBlock:
                    await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert [(r.kind, json.loads(r.payload or b"null"), r.at) for r in records] == [
        ("transform", {"n": 1}, 1_000_042.0)
    ]
