"""`ferry ctl event ID` on PostgreSQL: the twin of `daemon.store.confirmations` (same report).

An event id starts with its receipt time, and `received_at` grows with `seq`, so the lookup
starts at the first event received a few seconds before the id's time (`events_by_stream` does
not help here; the primary key on `seq` does), then takes the event and those derived from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daemon.store.event_report import DELIVERY_COLUMNS, bisect_seq, lookup_start, report, window_waits
from daemon.store.postgres.connect import Db
from daemon.store.types import MAX_EVENTS, EventReport


def _first_seq_since(db: Db, since: float) -> int:
    row = db.execute("SELECT min(seq), max(seq) FROM events").fetchone()
    if row is None or row[0] is None:
        return 0

    def probe(seq: int) -> Sequence[Any] | None:
        query = "SELECT seq, received_at FROM events WHERE seq >= %s ORDER BY seq LIMIT 1"
        found: Sequence[Any] | None = db.execute(query, (seq,)).fetchone()
        return found

    return bisect_seq(int(row[0]), int(row[1]) + 1, since, probe)


def event_outcomes(db: Db, event_id: str) -> EventReport | None:
    since = lookup_start(event_id)
    start = _first_seq_since(db, since) if since is not None else 0
    rows = db.execute(
        "SELECT seq, id, stream, payload, received_at FROM events WHERE seq >= %s AND (id = %s OR "
        '(id COLLATE "C" > %s AND id COLLATE "C" < %s)) ORDER BY seq LIMIT %s',
        (start, event_id, event_id + ".", event_id + "/", MAX_EVENTS),
    ).fetchall()
    windows = window_waits(
        db.execute(
            "SELECT e.id, w.transform, w.key, w.opened_at, w.size FROM window_events e "
            'JOIN windows w ON w.transform = e.transform AND w.id = e."window" '
            'WHERE e.id = %s OR (e.id COLLATE "C" > %s AND e.id COLLATE "C" < %s) ORDER BY w.opened_at',
            (event_id, event_id + ".", event_id + "/"),
        ).fetchall()
    )
    if not rows and not windows:
        return None
    deliveries = db.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE event_seq = ANY(%s) ORDER BY rowid",
        ([row[0] for row in rows],),
    ).fetchall()
    cipher = db.cipher

    def text(payload: bytes) -> str:
        return (payload if cipher is None else cipher.open(payload)).decode("utf-8", "replace")

    return report(rows, deliveries, windows, text)
