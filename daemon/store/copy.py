"""`ferry store copy`: move a SQLite outbox into an empty PostgreSQL database, whole, in one go.

For a user who outgrows one box: everything in flight comes along — pending and retrying
deliveries (same ids, so the same `Idempotency-Key`, attempts and next attempt times), dead
letters, stale ones, events (with `archive`, the replayable ones), transform cursors and crash
quarantine heads, poll state, pages and watermarks, dedup and replay keys, per-key versions of
ordered sinks, aggregation windows and their events, alert states, stored OAuth2 tokens, the
store's key ids and the audit trail.

Guarantees:
    Offline: the SQLite file is opened with an exclusive lock (`locking_mode = EXCLUSIVE`), which
    SQLite refuses while any other connection — a running daemon — has it open, and which keeps
    any daemon from opening it until the copy is done. A store in use is refused (`CopyRefused`).
    Empty target: the PostgreSQL database is migrated to the current schema (as a node would at
    start) and must then hold no row in any outbox table; otherwise it is refused, untouched.
    All or nothing: every row is written in one PostgreSQL transaction (`COPY … FROM STDIN`), the
    row count of every table is compared with SQLite's before the commit, and any difference or
    error rolls the whole copy back. The SQLite file is only read: it stays as it was, a fallback.
    Identity sequences (event seq, delivery and audit rowids, replay numbers) continue after the
    copied values, so nothing new can collide with what was copied.

Encrypted stores (`[store] encryption`): sealed payloads and tokens are copied byte for byte, with
`store_keys`, and are never decrypted (the copy needs no key). The PostgreSQL nodes must then run
with the same `encryption` keys; a node without them refuses to start (`StoreKeyMissing`), as the
SQLite daemon would.

Not copied: the cluster's own tables (nodes, leases, pauses, drains, rate budgets:
`daemon.store.postgres.schema.CLUSTER_TABLES`), which a SQLite store has none of; the target's
migrations create them empty.

What differs on PostgreSQL: a delivery's ordering version (one untyped SQLite column) is split into
`order_number`/`order_string`; copied deliveries carry no lease, so any node may claim them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg

from daemon.errors import StoreError
from daemon.store.postgres.connect import describe, open_database
from daemon.store.schema import APPLICATION_ID, MIGRATIONS

__all__ = ["TABLES", "Copied", "CopyRefused", "copy_store"]


class CopyRefused(StoreError):
    """The copy was not started: the source is in use or not a ferry store, or the target not empty."""


def _same(*columns: str) -> tuple[Sequence[str], Sequence[str]]:
    return columns, columns


_DELIVERY: Final = (
    "rowid",
    "id",
    "event_seq",
    "stage",
    "state",
    "attempts",
    "created_at",
    "next_attempt_at",
    "finished_at",
    "last_status",
    "last_error",
    "last_latency",
    "last_response",
    "order_key",
    "order_claimed",
)

# table: SQLite columns (read in this order) → PostgreSQL columns, where they differ.
TABLES: Final[dict[str, tuple[Sequence[str], Sequence[str]]]] = {
    "events": _same("seq", "id", "stream", "payload", "trace", "received_at"),
    "deliveries": ((*_DELIVERY, "order_version"), (*_DELIVERY, "order_number", "order_string")),
    "cursors": _same("name", "position"),
    "dedup": _same("source", "key", "event_id", "created_at"),
    "audit": _same("rowid", "at", "uid", "pid", "command", "arguments", "outcome"),
    "replays": _same("n", "at", "source", "since", "until", "sinks"),
    "auth_tokens": _same("owner", "token", "seed", "updated_at"),
    "store_keys": _same("kid", "added_at"),
    "replay_keys": _same("source", "key", "until"),
    "key_versions": (
        ("stage", "key", "delivered_at", "version"),
        ("stage", "key", "delivered_at", "number", "string"),
    ),
    "windows": _same("transform", "id", "key", "opened_at", "size"),
    "window_events": _same("transform", "window", "n", "id", "payload", "trace"),
    "poll_state": _same(
        "source",
        "mark",
        "etag",
        "last_modified",
        "validated_url",
        "next_url",
        "cycle_mark",
        "cycle_etag",
        "cycle_last_modified",
        "cycle_url",
        "pages",
        "job",
        "cycles",
        "refreshed",
        "cycle_refreshed",
        "updated_at",
    ),
    "poll_pages": _same(
        "source", "position", "url", "etag", "last_modified", "next_url", "mark", "refreshed_at"
    ),
    "alerts": _same("rule", "state", "updated_at"),
    "stage_heads": _same("stage", "head", "until", "attempts"),
}
"""Every table of the outbox; a test checks that it names every table and column of both schemas."""

_BINARY: Final = {("events", "payload"), ("window_events", "payload"), ("auth_tokens", "token")}
_SPLIT: Final = {"deliveries", "key_versions"}  # last SQLite column → (number, string)
_SEQUENCES: Final = {  # identity columns and sequences to continue after the copied values
    "events": "SELECT setval('events_seq', greatest((SELECT max(seq) FROM events), 1), "
    "(SELECT max(seq) FROM events) IS NOT NULL)",
    "deliveries": "SELECT setval(pg_get_serial_sequence('deliveries', 'rowid'), "
    "greatest((SELECT max(rowid) FROM deliveries), 1), (SELECT max(rowid) FROM deliveries) IS NOT NULL)",
    "audit": "SELECT setval(pg_get_serial_sequence('audit', 'rowid'), "
    "greatest((SELECT max(rowid) FROM audit), 1), (SELECT max(rowid) FROM audit) IS NOT NULL)",
    "replays": "SELECT setval(pg_get_serial_sequence('replays', 'n'), "
    "greatest((SELECT max(n) FROM replays), 1), (SELECT max(n) FROM replays) IS NOT NULL)",
}
_CHUNK: Final = 2000


@dataclass
class Copied:
    """What was copied: rows per table (equal on both sides, checked before the commit)."""

    source: Path
    target: str
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise CopyRefused(f"{path}: no such SQLite store")
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0.2, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise CopyRefused(
                    f"{path}: the store is in use (a running daemon?); stop it first — the copy is offline"
                ) from None
            raise CopyRefused(f"{path}: cannot be read ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise CopyRefused(f"{path}: not a SQLite database ({exc})") from None
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise CopyRefused(f"{path}: not a ferry store (application_id={app_id})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != len(MIGRATIONS):
            raise CopyRefused(
                f"{path}: schema version {version}, this ferry copies version {len(MIGRATIONS)}: "
                "run this ferry on it once (it migrates at start), stop it, then copy"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _rows(conn: sqlite3.Connection, table: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    quoted = ", ".join(f'"{column}"' for column in columns)
    binary = [i for i, column in enumerate(columns) if (table, column) in _BINARY]
    order = " ORDER BY rowid" if table in _ORDERED else ""
    cursor = conn.execute(f'SELECT {quoted} FROM "{table}"{order}')
    while chunk := cursor.fetchmany(_CHUNK):
        for row in chunk:
            values = list(row)
            for i in binary:
                if isinstance(values[i], str):
                    values[i] = values[i].encode("utf-8")
            if table in _SPLIT:
                version = values.pop()
                number = float(version) if isinstance(version, int | float) else None
                values += [number, None if number is not None or version is None else str(version)]
            yield tuple(values)


_ORDERED: Final = {"deliveries", "audit"}  # rowid tables read in rowid order (cheap, and tidy)


def _count(conn: psycopg.Connection[Any] | sqlite3.Connection, table: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    return int(row[0]) if row else 0


def _check_empty(conn: psycopg.Connection[Any], where: str) -> None:
    filled = []
    for table in TABLES:
        row = conn.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}")').fetchone()
        if row and row[0]:
            filled.append(table)
    if filled:
        raise CopyRefused(
            f"{where}: not empty (rows in {', '.join(filled)}); copy into a new, empty database "
            "— nothing was changed"
        )


def copy_store(source: Path, url: str) -> Copied:
    """Copy the SQLite store at `source` into the empty PostgreSQL database at `url`.

    Raises `CopyRefused` before writing anything (source in use, not ferry's or of another
    version; target not empty or not ferry's), `StoreError` subclasses from opening the target
    (`StoreUnavailable`, `StoreCorrupt`), and `StoreError` if the copy failed (rolled back).
    """
    where = describe(url)
    lite = _open_source(source)
    try:
        counts = {table: _count(lite, table) for table in TABLES}
        pg = open_database(url, node="store-copy", cipher=None)
        try:
            pg.rollback()
            pg.autocommit = True  # `transaction()` below is then the one real transaction
            _check_empty(pg, where)
            try:
                with pg.transaction():
                    pg.execute("LOCK TABLE events, deliveries IN EXCLUSIVE MODE")
                    _check_empty(pg, where)  # again, under the lock: no node started meanwhile
                    for table, (read, write) in TABLES.items():
                        columns = ", ".join(f'"{column}"' for column in write)
                        with pg.cursor().copy(f'COPY "{table}" ({columns}) FROM STDIN') as copy:
                            for row in _rows(lite, table, read):
                                copy.write_row(row)
                    for statement in _SEQUENCES.values():
                        pg.execute(statement)
                    copied = {table: _count(pg, table) for table in TABLES}
                    if copied != counts:
                        differ = {t: (counts[t], copied[t]) for t in TABLES if counts[t] != copied[t]}
                        raise StoreError(f"{where}: row counts differ after the copy {differ}; rolled back")
            except psycopg.Error as exc:
                raise StoreError(f"{where}: the copy failed and was rolled back ({exc})") from None
        finally:
            pg.close()
    finally:
        lite.close()
    return Copied(source, where, counts)
