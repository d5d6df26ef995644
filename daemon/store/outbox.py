"""What each stage reads from and writes to the store: plain functions of a connection.

They run on the store's writer thread inside a group transaction (see
`daemon.store`), so each is all-or-nothing with the rest of its request. They
take `now` from `time.time()` themselves so that timestamps follow commit order.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from daemon.store.at_rest import cipher_of
from daemon.store.schema import DEAD, DELIVERED, PENDING, STALE, STATE_NAMES
from daemon.store.types import (
    Derived,
    Due,
    Incoming,
    NewDeadLetter,
    NewEvent,
    Outcomes,
    StoredEvent,
    delivery_id,
    derived_id,
    new_event_id,
)

Connection = sqlite3.Connection


# Reads come back as one JSON array built inside SQLite (one `sqlite3_step`, see `insert_rows`);
# payloads travel as JSON strings, byte for byte as stored.
_rows = msgspec.json.Decoder(list[tuple[int, str, str, str, str | None]]).decode
_due_rows = msgspec.json.Decoder(list[tuple[int, str, int, float, str, str | None, str]]).decode


_INSERT_EVENT = "INSERT INTO events(seq, id, stream, payload, trace, received_at) VALUES "
_INSERT_DELIVERY = "INSERT INTO deliveries(id, event_seq, stage, created_at, next_attempt_at) VALUES "
_ROWS_PER_STATEMENT = 128
_statements: dict[tuple[str, int, int], str] = {}


def insert_rows(conn: Connection, insert: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert `rows` with multi-row `VALUES` statements (`insert` ends with `VALUES `).

    Why not `executemany`: Python's sqlite3 releases and re-takes the GIL around every
    `sqlite3_step`, i.e. once per row. While the event loop thread is busy that
    costs a thread handoff per row; one statement per 128 rows costs one.
    """
    if not rows:
        return
    width = len(rows[0])
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        key = (insert, width, len(chunk))
        sql = _statements.get(key)
        if sql is None:
            group = "(" + ",".join("?" * width) + ")"
            sql = _statements[key] = insert + ",".join([group] * len(chunk))
        conn.execute(sql, [value for row in chunk for value in row])


def store_events(
    conn: Connection, events: Sequence[NewEvent], now: float, dead: Sequence[NewDeadLetter] = ()
) -> int:
    """The outbox's write contract, written once: number `events` after the last seq, seal their
    payloads (`[store] encryption`), insert them with one pending delivery per sink, due now, then
    the `dead` letters (state `DEAD`, reason stored as valid UTF-8). Returns the first new seq
    (the events have `first`, `first + 1`, … in order).

    Every write of new events goes through here (`insert_events`, `commit_transform`,
    `windows.commit_emitted`) except `poll.commit_pages`, which writes the same rows with
    statements that bind a page's shared columns once (docs/performance.md) and takes its
    delivery ids from `delivery_id` too.
    """
    first = seq = last_seq(conn) + 1
    cipher = cipher_of(conn)
    rows: list[tuple[int, str, str, bytes, str | None, float]] = []
    deliveries: list[tuple[str, int, str, float, float]] = []
    for event_id, stream, payload, trace, sinks in events:
        rows.append((seq, event_id, stream, payload if cipher is None else cipher.seal(payload), trace, now))
        deliveries.extend((delivery_id(event_id, sink), seq, sink, now, now) for sink in sinks)
        seq += 1
    insert_rows(conn, _INSERT_EVENT, rows)
    insert_rows(conn, _INSERT_DELIVERY, deliveries)
    if dead:
        conn.executemany(
            "INSERT INTO deliveries(id, event_seq, stage, state, attempts, created_at, next_attempt_at, "
            f"finished_at, last_error) VALUES (?, ?, ?, {DEAD}, ?, ?, ?, ?, ?)",
            [
                (
                    delivery_id(letter.event_id, letter.stage),
                    letter.seq,
                    letter.stage,
                    letter.attempts,
                    now,
                    now,
                    now,
                    letter.error.encode("utf-8", "replace").decode("utf-8"),
                )
                for letter in dead
            ],
        )
    return first


def last_seq(conn: Connection) -> int:
    """The highest event seq ever used (AUTOINCREMENT's counter, which pruning never lowers).

    Only the writer thread inserts events, so the caller may number new events
    `last_seq + 1, + 2, …` itself and insert them in multi-row statements.
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return int(row[0]) if row else 0


def insert_events(
    conn: Connection, incoming: Sequence[Incoming], dedup_window: float = 86400.0
) -> list[tuple[str, bool]]:
    """Store received events and their deliveries; return (event id, duplicate) for each.

    An event whose `dedup_key` was seen for its stream within `dedup_window`
    (earlier, or earlier in this same call) stores nothing and returns the
    original event's id.

    Otherwise, an event whose `replay` key is remembered for its stream (earlier and not yet
    past its `until`, or earlier in this same call) stores nothing and returns `("", True)`;
    a stored event's key is remembered in this same transaction, so a failed commit forgets it
    too. (The idempotency key is looked at first: a sender's retry that carries it is answered
    as a duplicate, while a replay under a changed idempotency key is still caught.)
    """
    now = time.time()
    results: list[tuple[str, bool]] = []
    events: list[NewEvent] = []
    keys: dict[tuple[str, str], str] = {}
    replays: dict[tuple[str, str], float] = {}
    for stream, payload, trace, sinks, dedup_key, replay in incoming:
        if dedup_key is not None:
            original = keys.get((stream, dedup_key))
            if original is None:
                row = conn.execute(
                    "SELECT event_id, created_at FROM dedup WHERE source = ? AND key = ?", (stream, dedup_key)
                ).fetchone()
                if row is not None and row[1] > now - dedup_window:
                    original = row[0]
            if original is not None:
                results.append((original, True))
                continue
        if replay is not None and _replayed(conn, stream, replay[0], now, replays):
            results.append(("", True))
            continue
        event_id = new_event_id(now)
        events.append((event_id, stream, payload, trace, sinks))
        if dedup_key is not None:
            keys[(stream, dedup_key)] = event_id
        if replay is not None:
            replays[(stream, replay[0])] = replay[1]
        results.append((event_id, False))
    store_events(conn, events, now)
    if keys:
        conn.executemany(
            "INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)",
            [(stream, key, event_id, now) for (stream, key), event_id in keys.items()],
        )
    if replays:
        conn.executemany(
            "INSERT OR REPLACE INTO replay_keys VALUES (?, ?, ?)",
            [(stream, key, until) for (stream, key), until in replays.items()],
        )
    return results


def _replayed(
    conn: Connection, stream: str, key: str, now: float, batch: dict[tuple[str, str], float]
) -> bool:
    if (stream, key) in batch:
        return True
    row = conn.execute("SELECT until FROM replay_keys WHERE source = ? AND key = ?", (stream, key)).fetchone()
    return row is not None and row[0] >= now


def insert_event(
    conn: Connection,
    stream: str,
    payload: bytes,
    trace: str | None,
    sinks: Sequence[str],
    dedup_key: str | None = None,
    dedup_window: float = 86400.0,
) -> tuple[str, bool]:
    """`insert_events` for one event."""
    return insert_events(conn, [Incoming(stream, payload, trace, sinks, dedup_key)], dedup_window)[0]


def read_events(conn: Connection, streams: Sequence[str], after: int, limit: int) -> list[StoredEvent]:
    """Events of `streams` with seq > `after`, in seq order."""
    marks = ",".join("?" * len(streams))
    (text,) = conn.execute(
        "SELECT json_group_array(json_array(seq, id, stream, CAST(payload AS TEXT), trace)) FROM "
        f"(SELECT seq, id, stream, payload, trace FROM events WHERE stream IN ({marks}) AND seq > ? "
        "ORDER BY seq LIMIT ?)",
        (*streams, after, limit),
    ).fetchone()
    cipher = cipher_of(conn)
    if cipher is not None:
        return [
            StoredEvent(seq, id_, stream, cipher.open(payload.encode()), trace)
            for seq, id_, stream, payload, trace in _rows(text)
        ]
    return [
        StoredEvent(seq, id_, stream, payload.encode(), trace)
        for seq, id_, stream, payload, trace in _rows(text)
    ]


def cursor(conn: Connection, name: str) -> int:
    """A transform's position: the last event seq it has fully handled (0 when new)."""
    row = conn.execute("SELECT position FROM cursors WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def commit_transform(
    conn: Connection,
    name: str,
    position: int,
    outputs: Iterable[Derived],
    failures: Iterable[tuple[StoredEvent, str] | tuple[StoredEvent, str, int]],
    sinks: Sequence[str],
) -> int:
    """Store a transform's outputs as events of stream `name`, their deliveries, its dead letters,
    and its new cursor, all in the caller's transaction. Returns how many events were stored.

    A dead letter is (event, reason) or (event, reason, attempts); its reason is stored as valid
    UTF-8 whatever text it quotes.

    Output ids derive from the parent's (`PARENT.NAME[.INDEX]`), so re-running a
    transform after a crash produces the same ids and the same idempotency keys.
    """
    events: list[NewEvent] = [
        (derived_id(parent.id, name, nth), name, payload, parent.trace, sinks if routed is None else routed)
        for parent, nth, payload, routed in outputs
    ]
    dead = [
        NewDeadLetter(failure[0].id, failure[0].seq, name, failure[1], failure[2] if len(failure) > 2 else 1)
        for failure in failures
    ]
    store_events(conn, events, time.time(), dead)
    conn.execute("INSERT OR REPLACE INTO cursors(name, position) VALUES (?, ?)", (name, position))
    return len(events)


def due_deliveries(conn: Connection, stage: str, now: float, limit: int) -> list[Due]:
    """Pending deliveries of `stage` whose time has come, oldest schedule first."""
    (text,) = conn.execute(
        "SELECT json_group_array(json_array(rowid, id, attempts, created_at, CAST(payload AS TEXT), "
        "trace, event_id)) FROM (SELECT d.rowid, d.id, d.attempts, d.created_at, e.payload, e.trace, "
        "e.id AS event_id FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE d.stage = ? AND d.state = 0 AND d.next_attempt_at <= ? "
        "ORDER BY d.next_attempt_at, d.rowid LIMIT ?)",
        (stage, now, limit),
    ).fetchone()
    cipher = cipher_of(conn)
    if cipher is not None:
        return [
            Due(rowid, id_, attempts, created_at, cipher.open(payload.encode()), trace, event_id)
            for rowid, id_, attempts, created_at, payload, trace, event_id in _due_rows(text)
        ]
    return [
        Due(rowid, id_, attempts, created_at, payload.encode(), trace, event_id)
        for rowid, id_, attempts, created_at, payload, trace, event_id in _due_rows(text)
    ]


def renew_claims(conn: Connection, stage: str, rowids: Sequence[int]) -> set[int]:
    """One process owns the file, so a claim never lapses: the rows still pending."""
    found: set[int] = set()
    for start in range(0, len(rowids), 500):
        chunk = list(rowids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT rowid FROM deliveries WHERE stage = ? AND state = 0 AND rowid IN ({marks})",
                (stage, *chunk),
            )
        )
    return found


def next_due_after(conn: Connection, stage: str, now: float) -> float | None:
    """When the next pending delivery of `stage` not yet due at `now` becomes due, or None."""
    row = conn.execute(
        "SELECT min(next_attempt_at) FROM deliveries WHERE stage = ? AND state = 0 AND next_attempt_at > ?",
        (stage, now),
    ).fetchone()
    return None if row[0] is None else float(row[0])


def unpark(conn: Connection, stage: str, now: float, horizon: float) -> int:
    """Make due now the pending deliveries of `stage` scheduled more than `horizon` s ahead.

    No retry computed today waits that long (`daemon.limits.backoff.MAX_WAIT`): such a row was parked
    by an older ferry honouring any `Retry-After` (year 33,000). Returns how many were moved.
    """
    return conn.execute(
        "UPDATE deliveries SET next_attempt_at = ? WHERE stage = ? AND state = 0 AND next_attempt_at > ?",
        (now, stage, now + horizon),
    ).rowcount


def record_outcomes(
    conn: Connection, outcomes: Outcomes, latency: float | None = None, response: str | None = None
) -> None:
    """Mark attempts delivered, scheduled for retry, or dead; each counts one attempt.

    `latency` (seconds the attempt took) and `response` (an excerpt of the receiver's answer)
    describe the attempt all of these rows went out in; they replace the previous attempt's.
    """
    now = time.time()
    by_status: dict[int | None, list[int]] = {}
    for rowid, status in outcomes.delivered:
        by_status.setdefault(status, []).append(rowid)
    for status, rowids in by_status.items():
        for start in range(0, len(rowids), 500):
            chunk = rowids[start : start + 500]
            conn.execute(
                f"UPDATE deliveries SET state = {DELIVERED}, attempts = attempts + 1, finished_at = ?, "
                "last_status = ?, last_error = NULL, last_latency = ?, last_response = ? "
                f"WHERE rowid IN ({','.join('?' * len(chunk))})",
                [now, status, latency, response, *chunk],
            )
    if not (outcomes.retry or outcomes.dead):  # an empty executemany still prepares its statement
        return
    conn.executemany(
        "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?, "
        "last_error = ?, last_latency = ?, last_response = ? WHERE rowid = ?",
        [(at, status, error, latency, response, rowid) for rowid, at, status, error in outcomes.retry],
    )
    conn.executemany(
        f"UPDATE deliveries SET state = {DEAD}, attempts = attempts + 1, finished_at = ?, last_status = ?, "
        "last_error = ?, last_latency = ?, last_response = ? WHERE rowid = ?",
        [(now, status, error, latency, response, rowid) for rowid, status, error in outcomes.dead],
    )


def prune(
    conn: Connection,
    retention: float,
    dedup_window: float,
    readers: dict[str, list[str]],
    limit: int = 20_000,
    archive: float = 0.0,
) -> int:
    """Delete delivered rows older than `retention`, then events nothing needs any more.

    An event is kept while any delivery (pending or dead) refers to it, while a
    transform reading its stream has not passed it, or while it is younger than
    `retention` or `archive` (`[store] archive`: kept for `ferry ctl replay`). `readers`
    maps each configured stream to the transforms reading it (events of streams no
    longer configured are kept until an operator purges them).
    Deletes at most `limit` rows of each kind, so one call never holds the writer long.
    """
    now = time.time()
    cutoff = now - retention
    removed = 0
    for finished in (DELIVERED, STALE):  # one partial index each: deliveries_done, deliveries_stale
        removed += conn.execute(
            f"DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries WHERE state = {finished} "
            "AND finished_at < ? LIMIT ?)",
            (cutoff, limit),
        ).rowcount
    kept_since = now - max(retention, archive)
    positions = dict(conn.execute("SELECT name, position FROM cursors").fetchall())
    for stream, names in readers.items():
        upto = min((positions.get(name, 0) for name in names), default=2**62)
        removed += conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE stream = ? AND seq <= ? "
            "AND received_at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq) "
            "LIMIT ?)",
            (stream, upto, kept_since, limit),
        ).rowcount
    removed += conn.execute("DELETE FROM dedup WHERE created_at < ?", (now - dedup_window,)).rowcount
    removed += conn.execute(
        "DELETE FROM replay_keys WHERE rowid IN (SELECT rowid FROM replay_keys WHERE until < ? LIMIT ?)",
        (now, limit),
    ).rowcount
    return removed


def pending_total(conn: Connection) -> int:
    """Pending deliveries over every stage; counts the `deliveries_due` partial index, not the table."""
    return int(conn.execute(f"SELECT count(*) FROM deliveries WHERE state = {PENDING}").fetchone()[0])


def counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Deliveries per stage and state: `{"crm": {"pending": 3, "delivered": 10, "dead": 1}}`.

    `stale` (sinks with `ordering`) appears only for a stage that has such rows.
    """
    result: dict[str, dict[str, int]] = {}
    for stage, state, count in conn.execute(
        "SELECT stage, state, count(*) FROM deliveries GROUP BY stage, state"
    ).fetchall():
        result.setdefault(stage, {"pending": 0, "delivered": 0, "dead": 0})[STATE_NAMES[state]] = count
    return result


__all__ = [
    "Derived",
    "Due",
    "Incoming",
    "NewDeadLetter",
    "NewEvent",
    "Outcomes",
    "StoredEvent",
    "commit_transform",
    "counts",
    "cursor",
    "delivery_id",
    "derived_id",
    "due_deliveries",
    "insert_event",
    "insert_events",
    "insert_rows",
    "last_seq",
    "new_event_id",
    "next_due_after",
    "pending_total",
    "prune",
    "read_events",
    "record_outcomes",
    "store_events",
    "unpark",
]
