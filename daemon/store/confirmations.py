"""Confirmation: what became of one event, sink by sink (`ferry ctl event ID`).

Each delivery row records its outcome as it goes: state, attempts, the last status, the last
error, and — since the confirmation migration — how long the last attempt took
(`last_latency`) and what the receiver answered to it (`last_response`, an excerpt).
`event_outcomes` gathers, for an event id, that event and every event derived from it
(transform outputs `ID.NAME[.N]`, aggregates opened by it), each with its deliveries and
its transform dead letters, plus the windows still holding its outputs.

Cost:
    `events` has no index on `id` (ingest would pay for it on every insert). An event id
    starts with its receipt time in milliseconds, and `received_at` grows with `seq`, so the
    lookup first bisects `seq` by time (a few dozen indexed probes) and scans only the events
    stored since then. Deliveries are found through `deliveries_by_event`.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from daemon.store.at_rest import opened
from daemon.store.event_report import DELIVERY_COLUMNS, bisect_seq, lookup_start, report, window_waits
from daemon.store.types import (
    CLOCK_SLACK,
    MAX_EVENTS,
    DeliveryOutcome,
    EventOutcome,
    EventReport,
    WindowWait,
)

Connection = sqlite3.Connection


def first_seq_since(conn: Connection, since: float) -> int:
    """The seq from which on every event was received at `since` or later, and before which none
    was (bisected over seq; seqs may have gaps where events were pruned)."""
    row = conn.execute("SELECT min(seq), max(seq) FROM events").fetchone()
    if row[0] is None:
        return 0

    def probe(seq: int) -> Sequence[Any] | None:
        query = "SELECT seq, received_at FROM events WHERE seq >= ? ORDER BY seq LIMIT 1"
        found: Sequence[Any] | None = conn.execute(query, (seq,)).fetchone()
        return found

    return bisect_seq(int(row[0]), int(row[1]) + 1, since, probe)


def event_outcomes(conn: Connection, event_id: str) -> EventReport | None:
    """The report for `event_id` (a source's event or a derived one); None if nothing is stored."""
    since = lookup_start(event_id)
    start = first_seq_since(conn, since) if since is not None else 0
    rows = conn.execute(
        "SELECT seq, id, stream, CAST(payload AS TEXT), received_at FROM events "
        "WHERE seq >= ? AND (id = ? OR (id > ? AND id < ?)) ORDER BY seq LIMIT ?",
        (start, event_id, event_id + ".", event_id + "/", MAX_EVENTS),
    ).fetchall()
    windows = window_waits(
        conn.execute(
            "SELECT e.id, w.transform, w.key, w.opened_at, w.size FROM window_events e "
            "JOIN windows w ON w.transform = e.transform AND w.id = e.window "
            "WHERE e.id = ? OR (e.id > ? AND e.id < ?) ORDER BY w.opened_at",
            (event_id, event_id + ".", event_id + "/"),
        ).fetchall()
    )
    if not rows and not windows:
        return None
    deliveries = _deliveries(conn, [row[0] for row in rows])
    return report(
        rows, deliveries, windows, lambda payload: opened(conn, payload.encode()).decode("utf-8", "replace")
    )


def _deliveries(conn: Connection, seqs: list[int]) -> Iterator[Any]:
    """The deliveries of the events `seqs`, in rowid order per chunk of 500 (SQLite's bound parameters)."""
    chunks = (seqs[start : start + 500] for start in range(0, len(seqs), 500))
    return itertools.chain.from_iterable(
        conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries "
            f"WHERE event_seq IN ({','.join('?' * len(chunk))}) ORDER BY rowid",
            chunk,
        ).fetchall()
        for chunk in chunks
    )


__all__ = [
    "CLOCK_SLACK",
    "MAX_EVENTS",
    "DeliveryOutcome",
    "EventOutcome",
    "EventReport",
    "WindowWait",
    "event_outcomes",
    "first_seq_since",
]
