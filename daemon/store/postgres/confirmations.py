"""`ferry ctl event ID` on PostgreSQL: the twin of `daemon.store.confirmations` (same report).

An event id starts with its receipt time, and `received_at` grows with `seq`, so the lookup
starts at the first event received a few seconds before the id's time (`events_by_stream` does
not help here; the primary key on `seq` does), then takes the event and those derived from it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.store.postgres.connect import Db
from daemon.store.types import (
    _ROOT_ID,
    _STATES,
    CLOCK_SLACK,
    MAX_EVENTS,
    PENDING,
    DeliveryOutcome,
    EventOutcome,
    EventReport,
    WindowWait,
)


def _first_seq_since(db: Db, since: float) -> int:
    row = db.execute("SELECT min(seq), max(seq) FROM events").fetchone()
    if row is None or row[0] is None:
        return 0
    low, high = int(row[0]), int(row[1]) + 1
    while low < high:
        middle = (low + high) // 2
        found = db.execute(
            "SELECT seq, received_at FROM events WHERE seq >= %s ORDER BY seq LIMIT 1", (middle,)
        ).fetchone()
        if found is None or found[1] >= since:
            high = middle
        else:
            low = int(found[0]) + 1
    return low


def event_outcomes(db: Db, event_id: str) -> EventReport | None:
    match = _ROOT_ID.match(event_id)
    start = _first_seq_since(db, int(match.group(1), 16) / 1000 - CLOCK_SLACK) if match else 0
    rows = db.execute(
        "SELECT seq, id, stream, payload, received_at FROM events WHERE seq >= %s AND (id = %s OR "
        '(id COLLATE "C" > %s AND id COLLATE "C" < %s)) ORDER BY seq LIMIT %s',
        (start, event_id, event_id + ".", event_id + "/", MAX_EVENTS),
    ).fetchall()
    windows = [
        WindowWait(id=id_, transform=transform, key=_decoded(key), opened_at=opened, size=size)
        for id_, transform, key, opened, size in db.execute(
            "SELECT e.id, w.transform, w.key, w.opened_at, w.size FROM window_events e "
            'JOIN windows w ON w.transform = e.transform AND w.id = e."window" '
            'WHERE e.id = %s OR (e.id COLLATE "C" > %s AND e.id COLLATE "C" < %s) ORDER BY w.opened_at',
            (event_id, event_id + ".", event_id + "/"),
        ).fetchall()
    ]
    if not rows and not windows:
        return None
    by_seq: dict[int, list[DeliveryOutcome]] = {seq: [] for seq, *_ in rows}
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
    ) in db.execute(
        "SELECT event_seq, id, stage, state, attempts, created_at, finished_at, next_attempt_at, "
        "last_status, last_latency, last_response, last_error FROM deliveries WHERE event_seq = ANY(%s) "
        "ORDER BY rowid",
        (list(by_seq),),
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
    cipher = db.cipher
    events = [
        EventOutcome(
            id=id_,
            stream=stream,
            received_at=received,
            payload=_decoded(
                (payload if cipher is None else cipher.open(payload)).decode("utf-8", "replace")
            ),
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
