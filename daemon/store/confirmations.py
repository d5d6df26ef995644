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

import sqlite3
from typing import Any

import msgspec

from daemon.store.at_rest import opened
from daemon.store.schema import PENDING
from daemon.store.types import (
    _ROOT_ID,
    _STATES,
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
    low, high = int(row[0]), int(row[1]) + 1
    while low < high:
        middle = (low + high) // 2
        found = conn.execute(
            "SELECT seq, received_at FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (middle,)
        ).fetchone()
        if found is None or found[1] >= since:
            high = middle
        else:
            low = int(found[0]) + 1
    return low


def event_outcomes(conn: Connection, event_id: str) -> EventReport | None:
    """The report for `event_id` (a source's event or a derived one); None if nothing is stored."""
    match = _ROOT_ID.match(event_id)
    start = first_seq_since(conn, int(match.group(1), 16) / 1000 - CLOCK_SLACK) if match else 0
    rows = conn.execute(
        "SELECT seq, id, stream, CAST(payload AS TEXT), received_at FROM events "
        "WHERE seq >= ? AND (id = ? OR (id > ? AND id < ?)) ORDER BY seq LIMIT ?",
        (start, event_id, event_id + ".", event_id + "/", MAX_EVENTS),
    ).fetchall()
    windows = [
        WindowWait(id=id_, transform=transform, key=_decoded(key), opened_at=opened, size=size)
        for id_, transform, key, opened, size in conn.execute(
            "SELECT e.id, w.transform, w.key, w.opened_at, w.size FROM window_events e "
            "JOIN windows w ON w.transform = e.transform AND w.id = e.window "
            "WHERE e.id = ? OR (e.id > ? AND e.id < ?) ORDER BY w.opened_at",
            (event_id, event_id + ".", event_id + "/"),
        ).fetchall()
    ]
    if not rows and not windows:
        return None
    by_seq: dict[int, list[DeliveryOutcome]] = {seq: [] for seq, *_ in rows}
    seqs = list(by_seq)
    for chunk_start in range(0, len(seqs), 500):
        chunk = seqs[chunk_start : chunk_start + 500]
        for (
            seq,
            id_,
            stage,
            state,
            attempts,
            created,
            finished,
            due,
            status,
            latency,
            response,
            error,
        ) in conn.execute(
            "SELECT event_seq, id, stage, state, attempts, created_at, finished_at, next_attempt_at, "
            "last_status, last_latency, last_response, last_error FROM deliveries "
            f"WHERE event_seq IN ({','.join('?' * len(chunk))}) ORDER BY rowid",
            chunk,
        ).fetchall():
            by_seq[seq].append(
                DeliveryOutcome(
                    id=id_,
                    stage=stage,
                    state=_STATES.get(state, str(state)),
                    attempts=attempts,
                    created_at=created,
                    finished_at=finished,
                    next_attempt_at=due if state == PENDING else None,
                    status=status,
                    latency_s=latency,
                    response=response,
                    error=error,
                )
            )
    events = [
        EventOutcome(
            id=id_,
            stream=stream,
            received_at=received,
            payload=_decoded(opened(conn, payload.encode()).decode("utf-8", "replace")),
            deliveries=by_seq[seq],
        )
        for seq, id_, stream, payload, received in rows
    ]
    return EventReport(events=events, windows=windows)


def _decoded(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


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
