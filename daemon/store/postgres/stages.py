"""Transforms' retried dead letters, aggregation windows, poll sources, alert states and refresh
tokens on PostgreSQL: functions of a `Db`, each the twin of its SQLite module (named on each).

Events they write go through `daemon.store.postgres.outbox.store_events` under the events lock,
like every other event write. Which node runs a transform or a poll source is not decided here
(singletons: the cluster layer); these functions are correct for whichever node calls them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple
from typing import Any

from daemon.errors import StoreKeyMissing
from daemon.poison import clean
from daemon.store.at_rest import PREFIX
from daemon.store.postgres.connect import Db
from daemon.store.postgres.outbox import commit_transform, cursor, lock_events, store_events
from daemon.store.types import (
    _CHECK_COLUMNS,
    _COLUMNS,
    DEAD,
    DELIVERED,
    PENDING,
    AlertState,
    Committed,
    Derived,
    NewDeadLetter,
    NewEvent,
    PageCheck,
    PollState,
    Revived,
    StoredEvent,
    alert_rows,
    alert_states,
)
from daemon.store.windowing import Emitted, Joined, Window

# -- retried transform dead letters (daemon.store.transform_retry) -------------------------------


def revived(db: Db, stage: str, limit: int) -> list[Revived]:
    rows = db.execute(
        "SELECT d.rowid, d.attempts, e.seq, e.id, e.stream, e.payload, e.trace FROM (SELECT rowid, attempts, "
        f"event_seq, next_attempt_at FROM deliveries WHERE stage = %s AND state = {PENDING} "
        "ORDER BY next_attempt_at, rowid LIMIT %s) d JOIN events e ON e.seq = d.event_seq "
        "ORDER BY d.next_attempt_at, d.rowid",
        (stage, limit),
    ).fetchall()
    cipher = db.cipher
    return [
        Revived(
            rowid, attempts, StoredEvent(seq, id_, stream, cipher.open(payload) if cipher else payload, trace)
        )
        for rowid, attempts, seq, id_, stream, payload, trace in rows
    ]


def commit_revived(
    db: Db, name: str, row: Revived, outputs: Sequence[Derived], error: str | None, sinks: Sequence[str]
) -> None:
    if error is None:
        commit_transform(db, name, cursor(db, name), outputs, [], sinks)
    db.execute(
        "UPDATE deliveries SET state = %s, attempts = attempts + 1, finished_at = %s, last_error = %s "
        "WHERE rowid = %s",
        (
            DELIVERED if error is None else DEAD,
            time.time(),
            None if error is None else clean(error),
            row.rowid,
        ),
    )


# -- aggregation windows (daemon.store.windows) --------------------------------------------------


def stored_windows(db: Db, transform: str) -> list[tuple[int, str, float, int]]:
    rows = db.execute(
        "SELECT id, key, opened_at, size FROM windows WHERE transform = %s ORDER BY id", (transform,)
    ).fetchall()
    return [(int(i), str(k), float(o), int(s)) for i, k, o, s in rows]


def commit_joined(
    db: Db,
    transform: str,
    position: int,
    joined: Sequence[Joined],
    windows: Sequence[Window],
    failures: Sequence[tuple[StoredEvent, str]],
) -> None:
    commit_transform(db, transform, position, outputs=(), failures=failures, sinks=())
    cipher = db.cipher
    if joined:
        db.executemany(
            'INSERT INTO window_events(transform, "window", n, id, payload, trace) VALUES '
            "(%s, %s, %s, %s, %s, %s)",
            [
                (
                    transform,
                    j.window,
                    j.n,
                    j.id,
                    j.payload if cipher is None else cipher.seal(j.payload),
                    j.trace,
                )
                for j in joined
            ],
        )
    if windows:
        db.executemany(
            "INSERT INTO windows(transform, id, key, opened_at, size) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (transform, id) DO UPDATE SET size = excluded.size",
            [(transform, w.id, w.key, w.opened_at, w.size) for w in windows],
        )


def window_contents(
    db: Db, transform: str, window_ids: Sequence[int]
) -> dict[int, list[tuple[str, bytes, str | None]]]:
    contents: dict[int, list[tuple[str, bytes, str | None]]] = {window: [] for window in window_ids}
    cipher = db.cipher
    for window, id_, payload, trace in db.execute(
        'SELECT "window", id, payload, trace FROM window_events WHERE transform = %s AND "window" = ANY(%s) '
        'ORDER BY "window", n',
        (transform, list(window_ids)),
    ).fetchall():
        contents[window].append((id_, payload if cipher is None else cipher.open(payload), trace))
    return contents


def commit_emitted(db: Db, transform: str, emitted: Sequence[Emitted]) -> int:
    events: list[NewEvent] = []
    failed: list[tuple[int, str, str]] = []
    stored = 0
    for item in emitted:
        if item.error is not None:
            failed.append((len(events), item.id, item.error))
            events.append((item.id, f"{transform}/windows", item.contents, item.trace, ()))
        elif item.payload is not None:
            stored += 1
            events.append((item.id, transform, item.payload, item.trace, item.sinks))
    if events:
        lock_events(db)
    first = store_events(db, events, time.time(), numbered=bool(failed))
    if failed:
        dead = [NewDeadLetter(id_, first + index, transform, error) for index, id_, error in failed]
        store_events(db, (), time.time(), dead)
    ids = [item.window for item in emitted]
    db.execute('DELETE FROM window_events WHERE transform = %s AND "window" = ANY(%s)', (transform, ids))
    db.execute("DELETE FROM windows WHERE transform = %s AND id = ANY(%s)", (transform, ids))
    return stored


# -- poll sources (daemon.store.poll) ------------------------------------------------------------


def load_checks(db: Db, source: str) -> dict[int, PageCheck]:
    rows = db.execute(
        f"SELECT {', '.join(_CHECK_COLUMNS)} FROM poll_pages WHERE source = %s", (source,)
    ).fetchall()
    return {row[0]: PageCheck(*row) for row in rows}


def _save_checks(db: Db, source: str, checks: Sequence[PageCheck]) -> None:
    if checks:
        updates = ", ".join(f"{c} = excluded.{c}" for c in _CHECK_COLUMNS[1:])
        db.executemany(
            f"INSERT INTO poll_pages(source, {', '.join(_CHECK_COLUMNS)}) "
            f"VALUES (%s, {', '.join(['%s'] * len(_CHECK_COLUMNS))}) "
            f"ON CONFLICT (source, position) DO UPDATE SET {updates}",
            [(source, *astuple(check)) for check in checks],
        )


def load_state(db: Db, source: str) -> PollState:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM poll_state WHERE source = %s", (source,)).fetchone()
    return PollState(*row) if row else PollState()


def save_state(db: Db, source: str, state: PollState) -> None:
    updates = ", ".join(f"{c} = excluded.{c}" for c in [*_COLUMNS, "updated_at"])
    db.execute(
        f"INSERT INTO poll_state(source, {', '.join(_COLUMNS)}, updated_at) "
        f"VALUES (%s, {', '.join(['%s'] * len(_COLUMNS))}, %s) ON CONFLICT (source) DO UPDATE SET {updates}",
        (source, *astuple(state), time.time()),
    )


def commit_pages(
    db: Db,
    source: str,
    pages: Sequence[tuple[Sequence[str], Sequence[bytes], PollState]],
    sinks: Sequence[str],
    *,
    dedup_window: float,
    trace: str | None = None,
    checks: Sequence[PageCheck] = (),
) -> list[Committed]:
    """`daemon.store.poll.commit_pages` on PostgreSQL (the same rows, the same answers)."""
    if not pages:
        return []
    now = time.time()
    lock_events(db)
    every = list(dict.fromkeys(key for keys, _, _ in pages for key in keys))
    known = {
        key
        for (key,) in db.execute(
            "SELECT key FROM dedup WHERE source = %s AND created_at > %s AND key = ANY(%s)",
            (source, now - dedup_window, every),
        ).fetchall()
    }
    seen = set(known)
    fresh: list[tuple[list[str], list[bytes]]] = []
    for keys, items, _ in pages:
        page_keys: list[str] = []
        page_items: list[bytes] = []
        for key, payload in zip(keys, items, strict=True):
            if key not in seen:
                seen.add(key)
                page_keys.append(key)
                page_items.append(payload)
        fresh.append((page_keys, page_items))
    total = sum(len(k) for k, _ in fresh)
    stamp = f"{int(now * 1000):011x}"
    randomness = os.urandom(8 * total).hex()
    ids = [stamp + randomness[16 * n : 16 * n + 16] for n in range(total)]
    payloads = [payload for _, page_items in fresh for payload in page_items]
    store_events(db, [(id_, source, p, trace, sinks) for id_, p in zip(ids, payloads, strict=True)], now)
    fresh_keys = [key for page_keys, _ in fresh for key in page_keys]
    db.execute(
        "INSERT INTO dedup(source, key, event_id, created_at) SELECT %s, k, e, %s FROM "
        "unnest(%s::text[], %s::text[]) AS u(k, e) ON CONFLICT (source, key) DO UPDATE SET "
        "event_id = excluded.event_id, created_at = excluded.created_at",
        (source, now, fresh_keys, ids),
    )
    if known:
        db.execute(
            "UPDATE dedup SET created_at = %s WHERE source = %s AND key = ANY(%s)", (now, source, list(known))
        )
    save_state(db, source, pages[-1][2])
    _save_checks(db, source, checks)
    committed: list[Committed] = []
    position = 0
    for (keys, _, _), (page_keys, page_items) in zip(pages, fresh, strict=True):
        count = len(page_keys)
        committed.append(
            Committed(list(zip(ids[position : position + count], page_items, strict=True)), len(keys) - count)
        )
        position += count
    return committed


# -- alert states, refresh tokens (daemon.store.alerts, daemon.store.tokens) ----------------------


def load_alert_states(db: Db) -> dict[str, AlertState]:
    return alert_states(db.execute("SELECT rule, state FROM alerts").fetchall())


def save_alert_states(db: Db, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
    if states:
        db.executemany(
            "INSERT INTO alerts(rule, state, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (rule) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            alert_rows(states, time.time()),
        )
    db.execute("DELETE FROM alerts WHERE NOT (rule = ANY(%s))", (sorted(keep),))


def load_refresh_token(db: Db, owner: str) -> tuple[str, str] | None:
    row: Any = db.execute("SELECT token, seed FROM auth_tokens WHERE owner = %s", (owner,)).fetchone()
    if row is None:
        return None
    data = bytes(row[0])
    if data.startswith(PREFIX) and db.cipher is None:
        raise StoreKeyMissing("a stored value is encrypted but no [store] encryption key is configured")
    return (data if db.cipher is None else db.cipher.open(data)).decode(), row[1]


def save_refresh_token(db: Db, owner: str, token: str, seed: str) -> None:
    data = token.encode()
    db.execute(
        "INSERT INTO auth_tokens(owner, token, seed, updated_at) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (owner) DO UPDATE SET token = excluded.token, seed = excluded.seed, "
        "updated_at = excluded.updated_at",
        (owner, data if db.cipher is None else db.cipher.seal(data), seed, time.time()),
    )
