"""Events, ingest, transforms' cursors and outputs on PostgreSQL: functions of a `Db`.

The same contract as `daemon.store.outbox` (SQLite), written for several nodes at once:

Events commit in seq order:
    Every transaction that inserts events first takes `pg_advisory_xact_lock(EVENTS_LOCK)`, in a
    statement of its own, and holds it to its commit; seqs are taken from `events_seq` under it.
    So no event with a lower seq can commit after a higher one: a transform's cursor
    (`seq > position`) never passes an event that is still being written on another node. The
    lock is held per group transaction, not per event (group commit keeps its cost a fraction of a
    round trip per event); it serialises ingest across nodes, which is what the outbox's order
    costs.

De-duplication and replay keys across nodes:
    The lookups run after the lock, in later statements, so under READ COMMITTED they see every
    key a transaction that held the lock before committed (one on another node too).

Round trips per group of inserts: the lock, the key lookups (only when keys are present), one
statement for seqs + events + deliveries, one for the keys, and the commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from daemon.store.postgres.connect import Db
from daemon.store.postgres.schema import EVENTS_LOCK
from daemon.store.types import (
    DEAD,
    PENDING,
    STATE_NAMES,
    Derived,
    Incoming,
    NewDeadLetter,
    NewEvent,
    StoredEvent,
    delivery_id,
    derived_id,
    new_event_id,
)

_STORE = """WITH s AS (SELECT setval('events_seq', nextval('events_seq') + %(n)s - 1) - %(n)s AS base),
e AS (INSERT INTO events(seq, id, stream, payload, trace, received_at)
    SELECT s.base + u.i, u.id, u.stream, u.payload, u.trace, %(now)s FROM s,
    unnest(%(ids)s::text[], %(streams)s::text[], %(payloads)s::bytea[], %(traces)s::text[])
    WITH ORDINALITY AS u(id, stream, payload, trace, i)),
d AS (INSERT INTO deliveries(id, event_seq, stage, created_at, next_attempt_at)
    SELECT v.id, s.base + v.i, v.stage, %(now)s, %(now)s FROM s,
    unnest(%(dids)s::text[], %(dindex)s::bigint[], %(dstages)s::text[]) AS v(id, i, stage))
SELECT base + 1 FROM s"""


def lock_events(db: Db) -> None:
    """Take the events lock for the rest of this transaction (see the module docstring); once."""
    if not db.events_locked:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
        db.events_locked = True


def store_events(
    db: Db,
    events: Sequence[NewEvent],
    now: float,
    dead: Sequence[NewDeadLetter] = (),
    *,
    numbered: bool = False,
) -> int:
    """`daemon.store.outbox.store_events` on PostgreSQL: number, seal and insert `events` with one
    pending delivery per sink, then the `dead` letters. With `numbered`, returns the first new seq
    (reading it costs a round trip; 0 without). The caller holds the events lock (`lock_events`)."""
    first = 0
    if events:
        cipher = db.cipher
        ids, streams, payloads, traces = [], [], [], []
        dids: list[str] = []
        dindex: list[int] = []
        dstages: list[str] = []
        for n, (event_id, stream, payload, trace, sinks) in enumerate(events, start=1):
            ids.append(event_id)
            streams.append(stream)
            payloads.append(payload if cipher is None else cipher.seal(payload))
            traces.append(trace)
            for sink in sinks:
                dids.append(delivery_id(event_id, sink))
                dindex.append(n)
                dstages.append(sink)
        cursor = db.execute(
            _STORE,
            {
                "n": len(events),
                "now": now,
                "ids": ids,
                "streams": streams,
                "payloads": payloads,
                "traces": traces,
                "dids": dids,
                "dindex": dindex,
                "dstages": dstages,
            },
        )
        if numbered:
            row = cursor.fetchone()
            assert row is not None
            first = int(row[0])
    if dead:
        db.execute(
            "INSERT INTO deliveries(id, event_seq, stage, state, attempts, created_at, next_attempt_at, "
            f"finished_at, last_error) SELECT u.id, u.seq, u.stage, {DEAD}, u.attempts, %(now)s, %(now)s, "
            "%(now)s, u.error FROM unnest(%(ids)s::text[], %(seqs)s::bigint[], %(stages)s::text[], "
            "%(attempts)s::integer[], %(errors)s::text[]) AS u(id, seq, stage, attempts, error)",
            {
                "now": now,
                "ids": [delivery_id(letter.event_id, letter.stage) for letter in dead],
                "seqs": [letter.seq for letter in dead],
                "stages": [letter.stage for letter in dead],
                "attempts": [letter.attempts for letter in dead],
                "errors": [_text(letter.error) for letter in dead],
            },
        )
    return first


def _text(error: str) -> str:
    """A reason as PostgreSQL text: valid UTF-8 without NUL (which text cannot hold)."""
    return error.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\0")


def last_seq(db: Db) -> int:
    """The highest seq handed out so far (the events lock must be held to number from it)."""
    row = db.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_seq").fetchone()
    return int(row[0]) if row else 0


def insert_events(
    db: Db, incoming: Sequence[Incoming], dedup_window: float = 86400.0
) -> list[tuple[str, bool]]:
    """`daemon.store.outbox.insert_events` on PostgreSQL (same answers), across nodes."""
    now = time.time()
    lock_events(db)
    stored_keys: dict[tuple[str, str], str] = {}
    stored_replays: set[tuple[str, str]] = set()
    wanted = [(i.stream, i.dedup_key) for i in incoming if i.dedup_key is not None]
    replay_wanted = [(i.stream, i.replay[0]) for i in incoming if i.replay is not None]
    if wanted or replay_wanted:
        for kind, source, key, event_id in db.execute(
            "SELECT 'd', source, key, event_id FROM dedup WHERE created_at > %s AND (source, key) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[])) UNION ALL "
            "SELECT 'r', source, key, NULL FROM replay_keys WHERE until >= %s AND (source, key) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            (
                now - dedup_window,
                [s for s, _ in wanted],
                [k for _, k in wanted],
                now,
                [s for s, _ in replay_wanted],
                [k for _, k in replay_wanted],
            ),
        ).fetchall():
            if kind == "d":
                stored_keys[(source, key)] = event_id
            else:
                stored_replays.add((source, key))
    results: list[tuple[str, bool]] = []
    events: list[NewEvent] = []
    keys: dict[tuple[str, str], str] = {}
    replays: dict[tuple[str, str], float] = {}
    for stream, payload, trace, sinks, dedup_key, replay in incoming:
        if dedup_key is not None:
            original = keys.get((stream, dedup_key)) or stored_keys.get((stream, dedup_key))
            if original is not None:
                results.append((original, True))
                continue
        if replay is not None and ((stream, replay[0]) in replays or (stream, replay[0]) in stored_replays):
            results.append(("", True))
            continue
        event_id = new_event_id(now)
        events.append((event_id, stream, payload, trace, sinks))
        if dedup_key is not None:
            keys[(stream, dedup_key)] = event_id
        if replay is not None:
            replays[(stream, replay[0])] = replay[1]
        results.append((event_id, False))
    store_events(db, events, now)
    if keys or replays:
        db.execute(
            "WITH k AS (INSERT INTO dedup(source, key, event_id, created_at) "
            "SELECT s, k, e, %s FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(s, k, e) "
            "ON CONFLICT (source, key) DO UPDATE SET event_id = excluded.event_id, "
            "created_at = excluded.created_at) "
            "INSERT INTO replay_keys(source, key, until) SELECT s, k, t FROM "
            "unnest(%s::text[], %s::text[], %s::float8[]) AS u(s, k, t) "
            "ON CONFLICT (source, key) DO UPDATE SET until = excluded.until",
            (
                now,
                [s for s, _ in keys],
                [k for _, k in keys],
                list(keys.values()),
                [s for s, _ in replays],
                [k for _, k in replays],
                list(replays.values()),
            ),
        )
    return results


def read_events(db: Db, streams: Sequence[str], after: int, limit: int) -> list[StoredEvent]:
    """Events of `streams` with seq > `after`, in seq order."""
    rows = db.execute(
        "SELECT seq, id, stream, payload, trace FROM events WHERE stream = ANY(%s) AND seq > %s "
        "ORDER BY seq LIMIT %s",
        (list(streams), after, limit),
    ).fetchall()
    cipher = db.cipher
    return [
        StoredEvent(seq, id_, stream, payload if cipher is None else cipher.open(payload), trace)
        for seq, id_, stream, payload, trace in rows
    ]


def cursor(db: Db, name: str) -> int:
    row = db.execute("SELECT position FROM cursors WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def save_cursor(db: Db, name: str, position: int) -> None:
    db.execute(
        "INSERT INTO cursors(name, position) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (name, position),
    )


def commit_transform(
    db: Db,
    name: str,
    position: int,
    outputs: Iterable[Derived],
    failures: Iterable[tuple[StoredEvent, str] | tuple[StoredEvent, str, int]],
    sinks: Sequence[str],
) -> int:
    """`daemon.store.outbox.commit_transform` on PostgreSQL."""
    events: list[NewEvent] = [
        (derived_id(parent.id, name, nth), name, payload, parent.trace, sinks if routed is None else routed)
        for parent, nth, payload, routed in outputs
    ]
    dead = [
        NewDeadLetter(failure[0].id, failure[0].seq, name, failure[1], failure[2] if len(failure) > 2 else 1)
        for failure in failures
    ]
    if events:
        lock_events(db)
    store_events(db, events, time.time(), dead)
    save_cursor(db, name, position)
    return len(events)


def prune(
    db: Db,
    retention: float,
    dedup_window: float,
    readers: dict[str, list[str]],
    limit: int = 20_000,
    archive: float = 0.0,
) -> int:
    """`daemon.store.outbox.prune` on PostgreSQL (bounded per call, the same rules)."""
    now = time.time()
    cutoff = now - retention
    removed = 0
    for finished in (1, 3):  # delivered, stale
        removed += db.count(
            "DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries WHERE state = %s "
            "AND finished_at < %s LIMIT %s)",
            (finished, cutoff, limit),
        )
    kept_since = now - max(retention, archive)
    positions = dict(db.execute("SELECT name, position FROM cursors").fetchall())
    for stream, names in readers.items():
        upto = min((positions.get(name, 0) for name in names), default=2**62)
        removed += db.count(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE stream = %s AND seq <= %s "
            "AND received_at < %s AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq) "
            "LIMIT %s)",
            (stream, upto, kept_since, limit),
        )
    removed += db.count("DELETE FROM dedup WHERE created_at < %s", (now - dedup_window,))
    removed += db.count(
        "DELETE FROM replay_keys WHERE (source, key) IN (SELECT source, key FROM "
        "replay_keys WHERE until < %s "
        "LIMIT %s)",
        (now, limit),
    )
    return removed


def pending_total(db: Db) -> int:
    row = db.execute(f"SELECT count(*) FROM deliveries WHERE state = {PENDING}").fetchone()
    return int(row[0]) if row else 0


def counts(db: Db) -> dict[str, dict[str, int]]:
    """Deliveries per stage and state, as `daemon.store.outbox.counts`."""
    result: dict[str, dict[str, int]] = {}
    rows: list[Any] = db.execute(
        "SELECT stage, state, count(*) FROM deliveries GROUP BY stage, state"
    ).fetchall()
    for stage, state, count in rows:
        result.setdefault(stage, {"pending": 0, "delivered": 0, "dead": 0})[STATE_NAMES[state]] = int(count)
    return result
