"""What a poll source keeps in the store: its state row, and each page's items with that state.

Plain functions of a connection, run on the store's writer thread inside a group transaction
(`daemon.store`), like `daemon.store.outbox`.

Exactly once:
    `commit_page` (`commit_pages`: several, in order) stores a page's new items (events +
    deliveries; payloads sealed like every event's when `[store] encryption` is on), their
    keys (`dedup`) and the poller's new state — the next page to fetch,
    the mark, the validators — in the one transaction of its call. A crash before it commits
    loses nothing (the page is fetched again from the stored position); a crash after it
    cannot repeat anything (the position has moved on, and an item seen again is found by
    its key). The validators of each page read in full (`PageCheck`, table `poll_pages`) are
    written in that same transaction, so a stored validator always stands for items that are
    stored, and for the next cursor they led to.

Keys:
    A poll source's keys live in `dedup` under the source's name (names are unique across
    components, so they never meet a webhook source's). A key seen again has its time
    refreshed, so a key is forgotten only `[store] dedup_window` after the API last listed
    the item, not after it was first stored.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import astuple
from itertools import chain
from typing import Final

from daemon.store.at_rest import cipher_of
from daemon.store.outbox import delivery_id, insert_rows, last_seq
from daemon.store.types import _CHECK_COLUMNS, _COLUMNS, Committed, PageCheck, PollState

Connection = sqlite3.Connection

_INSERT_DELIVERY: Final = "INSERT INTO deliveries(id, event_seq, stage, created_at, next_attempt_at) VALUES "
_CHUNK: Final = 500

# Multi-row inserts whose values shared by every row are bound once (?1, ?2, ?3) and the rest
# per row, numbered: half the parameters to bind (with the GIL held) of one `?` per value.
_EVENTS: Final = (
    "INSERT INTO events(seq, id, stream, payload, trace, received_at) VALUES ",
    "(?{},?{},?1,?{},?2,?3)",  # source, trace, now; then seq, id, payload per row
    3,
)
_KEYS: Final = (
    "INSERT OR REPLACE INTO dedup(source, key, event_id, created_at) VALUES ",
    "(?1,?{},?{},?2)",  # source, now; then key, event id per row
    2,
)
_ROWS: Final = 256  # rows per statement: at most 3 + 3 * 256 parameters, under SQLite's old 999
_statements: dict[tuple[str, int], str] = {}


def _statement(kind: tuple[str, str, int], rows: int) -> str:
    """The INSERT of `rows` rows of `kind` (`_EVENTS`, `_KEYS`)."""
    insert, row, shared = kind
    sql = _statements.get((insert, rows))
    if sql is None:
        width = row.count("{}")
        values = ",".join(
            row.format(*range(shared + 1 + width * n, shared + 1 + width * (n + 1))) for n in range(rows)
        )
        sql = _statements[(insert, rows)] = insert + values
    return sql


def load_checks(conn: Connection, source: str) -> dict[int, PageCheck]:
    """`source`'s stored page checks by position."""
    rows = conn.execute(
        f"SELECT {', '.join(_CHECK_COLUMNS)} FROM poll_pages WHERE source = ?", (source,)
    ).fetchall()
    return {row[0]: PageCheck(*row) for row in rows}


def save_checks(conn: Connection, source: str, checks: Sequence[PageCheck]) -> None:
    """Write `checks` (each replaces the one at its position), in the caller's transaction."""
    if checks:
        conn.executemany(
            f"INSERT OR REPLACE INTO poll_pages(source, {', '.join(_CHECK_COLUMNS)}) "
            f"VALUES (?, {', '.join('?' * len(_CHECK_COLUMNS))})",
            [(source, *astuple(check)) for check in checks],
        )


def load_state(conn: Connection, source: str) -> PollState:
    """The stored state of `source` (a fresh one if it never polled)."""
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM poll_state WHERE source = ?", (source,)).fetchone()
    return PollState(*row) if row else PollState()


def save_state(conn: Connection, source: str, state: PollState) -> None:
    """Write `state` as `source`'s row (in the caller's transaction)."""
    conn.execute(
        f"INSERT OR REPLACE INTO poll_state(source, {', '.join(_COLUMNS)}, updated_at) "
        f"VALUES (?, {', '.join('?' * len(_COLUMNS))}, ?)",
        (source, *astuple(state), time.time()),
    )


def commit_page(
    conn: Connection,
    source: str,
    keys: Sequence[str],
    items: Sequence[bytes],
    sinks: Sequence[str],
    state: PollState,
    *,
    dedup_window: float,
    trace: str | None = None,
) -> Committed:
    """Store the items whose keys are new (events, deliveries, keys) and `state`, in one transaction.

    An item is a repeat if its key was stored for `source` within `dedup_window`, or earlier
    in the same page; a repeat stores nothing but refreshes its key's time.
    """
    (committed,) = commit_pages(
        conn, source, [(keys, items, state)], sinks, dedup_window=dedup_window, trace=trace
    )
    return committed


def commit_pages(
    conn: Connection,
    source: str,
    pages: Sequence[tuple[Sequence[str], Sequence[bytes], PollState]],
    sinks: Sequence[str],
    *,
    dedup_window: float,
    trace: str | None = None,
    checks: Sequence[PageCheck] = (),
) -> list[Committed]:
    """`commit_page` for each (keys, items, state) in order, in the caller's one transaction.

    The same rows as one `commit_page` per page would write (an item is a repeat of one stored
    earlier, or earlier in these pages), with a handful of statements for all the pages: the
    writer thread re-takes the GIL after every statement, and the event loop's thread is busy
    fetching the next pages meanwhile. Only the last page's state is written (the earlier ones
    would be overwritten in this same transaction). Payloads are sealed when `[store]
    encryption` is on; `Committed.events` holds them in clear. `checks` (the validators of the
    pages read in full) are written in the same transaction.
    """
    if not pages:
        return []
    now = time.time()
    every = list(dict.fromkeys(key for keys, _, _ in pages for key in keys))
    known: set[str] = set()
    for start in range(0, len(every), _CHUNK):
        chunk = every[start : start + _CHUNK]
        known.update(
            key
            for (key,) in conn.execute(
                "SELECT key FROM dedup WHERE source = ? AND created_at > ? "
                f"AND key IN ({','.join('?' * len(chunk))})",
                (source, now - dedup_window, *chunk),
            )
        )
    seen = set(known)
    fresh: list[tuple[list[str], list[bytes]]] = []
    total = 0
    for keys, items, _ in pages:
        page_keys: list[str] = []
        page_items: list[bytes] = []
        for key, payload in zip(keys, items, strict=True):
            if key not in seen:
                seen.add(key)
                page_keys.append(key)
                page_items.append(payload)
        fresh.append((page_keys, page_items))
        total += len(page_keys)
    # Event ids as `outbox.new_event_id` makes them, with one read of the random source per call.
    stamp = f"{int(now * 1000):011x}"
    randomness = os.urandom(8 * total).hex()
    ids = [stamp + randomness[16 * n : 16 * n + 16] for n in range(total)]
    payloads = [payload for _, page_items in fresh for payload in page_items]
    cipher = cipher_of(conn)
    stored = payloads if cipher is None else [cipher.seal(payload) for payload in payloads]
    first = last_seq(conn) + 1
    fresh_keys = [key for page_keys, _ in fresh for key in page_keys]
    for start in range(0, total, _ROWS):
        end = min(start + _ROWS, total)
        rows = zip(range(first + start, first + end), ids[start:end], stored[start:end], strict=True)
        conn.execute(_statement(_EVENTS, end - start), [source, trace, now, *chain.from_iterable(rows)])
    if sinks:
        insert_rows(
            conn,
            _INSERT_DELIVERY,
            [
                (delivery_id(event_id, sink), first + n, sink, now, now)
                for n, event_id in enumerate(ids)
                for sink in sinks
            ],
        )
    for start in range(0, total, _ROWS):
        end = min(start + _ROWS, total)
        pairs = zip(fresh_keys[start:end], ids[start:end], strict=True)
        conn.execute(_statement(_KEYS, end - start), [source, now, *chain.from_iterable(pairs)])
    repeated = list(known)
    for start in range(0, len(repeated), _CHUNK):
        chunk = repeated[start : start + _CHUNK]
        conn.execute(
            f"UPDATE dedup SET created_at = ? WHERE source = ? AND key IN ({','.join('?' * len(chunk))})",
            (now, source, *chunk),
        )
    save_state(conn, source, pages[-1][2])
    save_checks(conn, source, checks)
    committed: list[Committed] = []
    position = 0
    for (keys, _, _), (page_keys, page_items) in zip(pages, fresh, strict=True):
        count = len(page_keys)
        committed.append(
            Committed(list(zip(ids[position : position + count], page_items, strict=True)), len(keys) - count)
        )
        position += count
    return committed


__all__ = [
    "Committed",
    "PageCheck",
    "PollState",
    "commit_page",
    "commit_pages",
    "load_checks",
    "load_state",
    "save_checks",
    "save_state",
]
