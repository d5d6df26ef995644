"""`ferry ctl event`'s store side: the bisected lookup by time, derived events, deliveries, windows."""

from __future__ import annotations

import os
import random
import sqlite3
from functools import partial
from pathlib import Path

import pytest
import trio

from daemon.store import outbox
from daemon.store.at_rest import Cipher
from daemon.store.confirmations import event_outcomes, first_seq_since
from daemon.store.outbox import Outcomes, StoredEvent, record_outcomes
from daemon.store.sqlite import Connection, Store
from daemon.store.windows import Joined, Window, commit_joined, window_contents


def fill(conn: Connection, times: list[float]) -> None:
    for at in times:
        outbox.insert_event(conn, "src", b"{}", None, [])
        conn.execute("UPDATE events SET received_at = ? WHERE seq = (SELECT max(seq) FROM events)", (at,))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_first_seq_since_agrees_with_a_scan(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    times = sorted(rng.uniform(0, 1000) for _ in range(300))

    def check(conn: Connection) -> None:
        fill(conn, times)
        conn.execute("DELETE FROM events WHERE seq % 7 = 0")  # pruned rows leave gaps in seq
        rows = conn.execute("SELECT seq, received_at FROM events ORDER BY seq").fetchall()
        for since in [-1.0, 0.0, *rng.sample(times, 20), 999.9, 2000.0]:
            start = first_seq_since(conn, since)
            assert all(at >= since for seq, at in rows if seq >= start), since
            assert all(at < since for seq, at in rows if seq < start), since

    await store.call(check)


async def test_an_event_with_its_outputs_outcomes_and_waiting_windows(store: Store) -> None:
    def setup(conn: Connection) -> tuple[str, str]:
        root, _ = outbox.insert_event(conn, "sf", b'{"email":"a@b.c"}', None, [])
        other, _ = outbox.insert_event(conn, "sf", b'{"email":"x@y.z"}', None, [])
        parent = StoredEvent(1, root, "sf", b"", None)
        outbox.commit_transform(
            conn, "contact", 2, [outbox.Derived(parent, 0, b'{"e":1}')], [], sinks=["crm", "hubspot"]
        )
        rowids = dict(conn.execute("SELECT id, rowid FROM deliveries").fetchall())
        record_outcomes(
            conn, Outcomes([(rowids[f"{root}.contact.crm"], 201)], [], []), latency=0.012, response='{"id":7}'
        )
        record_outcomes(
            conn,
            Outcomes([], [(rowids[f"{root}.contact.hubspot"], 9e9, 503, "HTTP 503: busy")], []),
            latency=0.5,
        )
        joined = [Joined(4, 0, f"{root}.totals", b"{}", None)]
        commit_joined(conn, "totals", 2, joined, [Window(4, '"books"', 1000.0, None, 1)], [])
        return root, other

    root, other = await store.call(setup)
    report = await store.call(partial(event_outcomes, event_id=root))
    assert report is not None
    assert [(e.id, e.stream) for e in report.events] == [(root, "sf"), (f"{root}.contact", "contact")]
    assert report.events[0].payload == {"email": "a@b.c"}
    crm, hubspot = report.events[1].deliveries
    assert (crm.stage, crm.state, crm.status, crm.attempts, crm.latency_s, crm.response) == (
        "crm",
        "delivered",
        201,
        1,
        0.012,
        '{"id":7}',
    )
    assert (hubspot.state, hubspot.status, hubspot.error, hubspot.next_attempt_at) == (
        "pending",
        503,
        "HTTP 503: busy",
        9e9,
    )
    [waiting] = report.windows
    assert (waiting.id, waiting.transform, waiting.key, waiting.size) == (
        f"{root}.totals",
        "totals",
        "books",
        1,
    )

    # A derived id finds itself; another event's id finds none of this one's rows.
    derived = await store.call(partial(event_outcomes, event_id=f"{root}.contact"))
    assert derived is not None
    assert [e.id for e in derived.events] == [f"{root}.contact"]
    alone = await store.call(partial(event_outcomes, event_id=other))
    assert alone is not None
    assert [e.id for e in alone.events] == [other]
    assert alone.windows == []
    assert await store.call(partial(event_outcomes, event_id="f" * 27)) is None
    assert await store.call(partial(event_outcomes, event_id="not-an-id")) is None


async def test_encrypted_windows_and_event_payloads_are_sealed_on_disk_and_read_in_clear(
    tmp_path: Path,
) -> None:
    marker = b"WINDOW-MARKER-0815"
    path = tmp_path / "ferry.db"
    store = Store.open(path, durability="normal", cipher=Cipher(os.urandom(32)))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)

        def setup(conn: Connection) -> str:
            root, _ = outbox.insert_event(conn, "sf", b'{"m":"' + marker + b'"}', None, [])
            joined = [Joined(1, 0, f"{root}.totals", b'{"m":"' + marker + b'"}', None)]
            commit_joined(conn, "totals", 1, joined, [Window(1, '"k"', 0.0, None, 1)], [])
            return root

        root = await store.call(setup)
        report = await store.call(partial(event_outcomes, event_id=root))
        contents = await store.call(partial(window_contents, transform="totals", window_ids=[1]))
        nursery.cancel_scope.cancel()
    store.close()
    assert report is not None
    assert report.events[0].payload == {"m": marker.decode()}
    assert contents == {1: [(f"{root}.totals", b'{"m":"' + marker + b'"}', None)]}
    with sqlite3.connect(path) as db:
        stored = [bytes(p) for (p,) in db.execute("SELECT payload FROM window_events")]
    assert stored
    assert all(marker not in payload for payload in stored)
