"""The SQLite outbox: the one durable boundary between every stage.

Durability:
    WAL mode, `synchronous=FULL` unless `durability = "normal"`. A call returns
    only after the transaction holding its writes has committed, so a caller
    that acknowledges after `await store.call(...)` never acknowledges
    something a crash can take back.

Group commit, outages, wake-ups, cancellation:
    the engine both backends share (`daemon.store.engine.GroupCommit`): one writer thread
    owns the only connection and commits the requests waiting in its queue as one
    transaction. What is SQLite's here is `SqliteTransactions`: `BEGIN IMMEDIATE`, and which
    errors are a request's own (integrity, programming) as opposed to the file failing; a full
    disk retries the group's requests one by one, so reads and writes that fit still succeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import TypeVar, final

from daemon.errors import StoreCorrupt, StoreKeyMissing, StoreUnavailable
from daemon.store.api import Outbox
from daemon.store.at_rest import PREFIX, Cipher
from daemon.store.engine import Failure
from daemon.store.operations import Operations
from daemon.store.schema import APPLICATION_ID, MIGRATIONS
from daemon.store.sqlite_ops import FUNCTIONS

log = logging.getLogger("ferry.store")
T = TypeVar("T")
Connection = sqlite3.Connection


PAGE_CACHE_KIB = 4096
"""SQLite's page cache, per connection. It fills as the database grows, so it is the daemon's
resident memory that grows with a backlog; at 4 MiB it is full after ~20,000 events, and a bigger
one measured no faster (ingest, drain: docs/reliability.md#memory-during-an-outage). The kernel's
file cache holds the rest of the hot pages."""


@final
class SqliteTransactions:
    """The engine's SQLite half: one connection, opened before the engine runs."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def connection(self) -> Connection:
        return self.conn

    def begin(self, conn: Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Connection) -> None:
        _rollback(conn)

    def classify(self, exc: Exception) -> Failure:
        if not isinstance(exc, sqlite3.Error) or _is_request_error(exc):
            return Failure.REQUEST
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return Failure.EACH
        return Failure.UNAVAILABLE

    announces = False
    """One process owns the file: its in-process wake-ups reach every consumer."""

    def announce(self, conn: Connection, consumers: set[str]) -> None:
        pass


@final
class Store(Operations[Connection]):
    """The outbox. Open with `Store.open(path, ...)`, serve with `await nursery.start(store.run)`.

    Components use its domain operations (`daemon.store.api.Outbox`, declared once for both
    backends in `daemon.store.operations` over SQLite's store functions, `daemon.store.sqlite_ops`);
    each runs its store function `fn(conn)` through `call` (or
    `call_until_committed`) on the writer thread, inside a group transaction
    (`daemon.store.engine`). Tests may call `store.call(fn)` directly; nothing outside
    `daemon/store/` does.
    """

    def __init__(
        self, path: Path, *, durability: str = "full", max_batch: int = 4096, cipher: Cipher | None = None
    ) -> None:
        super().__init__(FUNCTIONS, max_batch=max_batch)
        self.path = path
        self._durability = durability
        self._cipher = cipher
        self._conn: Connection | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        durability: str = "full",
        max_batch: int = 4096,
        verify: bool = False,
        cipher: Cipher | None = None,
    ) -> Store:
        """Open (creating if needed) and migrate the database; see `open_connection`.

        Raises `StoreCorrupt` for a foreign, damaged or newer file and `StoreUnavailable` for one
        that cannot be created, read or written. Never overwrites or "repairs" a file it does not
        recognise. With `cipher`, payloads are encrypted (`daemon.store.at_rest`); rows that need a key
        `cipher` lacks (or any key, without one) raise `StoreKeyMissing` before anything is written.
        """
        store = cls(Path(path), durability=durability, max_batch=max_batch, cipher=cipher)
        store._conn = open_connection(store.path, durability, verify=verify, cipher=cipher)
        store._transactions = SqliteTransactions(store._conn)
        return store

    def close(self) -> None:
        """Close the connection (after `run` has returned)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._transactions = None


def _rollback(conn: Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _is_request_error(exc: sqlite3.Error) -> bool:
    """Errors one request can cause by itself (as opposed to the disk or the file failing)."""
    return isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError)


def open_connection(
    path: Path, durability: str, *, verify: bool = False, cipher: Cipher | None = None
) -> Connection:
    """Open, identify, check and migrate the database file. Raises `StoreCorrupt` or `StoreUnavailable`.

    Nothing is written to a file until it is known to be ferry's (or empty): a foreign, damaged or
    newer file is refused as it is. `verify` runs SQLite's `quick_check` (every page read once,
    about 1 s per GB) before the first write, so a damaged file is refused at startup with its
    name instead of failing later, one write at a time. Every error message names the file.
    Rows encrypted with a key `cipher` lacks raise `StoreKeyMissing`, also before any write.
    """
    if path.exists() and not path.is_file():
        raise StoreCorrupt(f"{path}: not a regular file")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"{path.parent}: cannot create state directory: {exc.strerror}") from None
    try:
        _create_private(path)
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=5.0, factory=CipherConnection
        )
    except (sqlite3.Error, OSError) as exc:
        raise StoreUnavailable(f"{path}: cannot open database ({exc}); {_OWNERSHIP}") from None
    try:
        _identify(conn, path)
        if verify:
            _quick_check(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        _migrate(conn, path)
        check_keys(conn, cipher, path)
        _probe_write(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise StoreCorrupt(
                f"{path}: not a usable SQLite database ({exc}); the file was left untouched"
            ) from None
        if "readonly" in str(exc) or "unable to open" in str(exc):
            raise StoreUnavailable(f"{path}: cannot write to the database ({exc}); {_OWNERSHIP}") from None
        raise StoreUnavailable(f"{path}: {exc}") from None
    except BaseException:
        conn.close()
        raise
    conn.cipher = cipher
    return conn


def _create_private(path: Path) -> None:
    """Create a missing database file mode 0600, whatever the umask: SQLite gives its `-wal` and
    `-shm` files the database file's mode, so they are private too. An existing file keeps its mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


_OWNERSHIP = (
    "the daemon's user must be able to read and write the file, its -wal and -shm files and its folder"
)


def _quick_check(conn: Connection, path: Path) -> None:
    problems = [" ".join(str(row[0]).split()) for row in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = "; ".join(problems)
        raise StoreCorrupt(
            f"{path}: the database is damaged ({found[:300]}); the file was left untouched: "
            "restore it from a backup or salvage it with `sqlite3 FILE .recover` (docs/runbook.md)"
        )


def _probe_write(conn: Connection) -> None:
    """Prove the file (and its -wal/-shm) can be written now, not at the first webhook.

    Rewriting `user_version` with its own value is one tiny transaction that changes nothing.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"PRAGMA user_version={version}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _identify(conn: Connection, path: Path) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id != 0 or tables:
        raise StoreCorrupt(
            f"{path}: not a ferry database (application_id={app_id}); the file was left untouched"
        )


def _migrate(conn: Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreCorrupt(
            f"{path}: database schema version {version} is newer than this ferry ({len(MIGRATIONS)}); "
            "the file was left untouched: run the newer ferry that wrote it"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        log.info("store migrated", extra={"fields": {"version": number}})


def _implements_outbox(store: Store) -> Outbox:
    """mypy checks here that `Store` implements the whole interface."""
    return store


# -- encryption at rest: the keys the file's rows need (daemon.store.at_rest) ---------------


class CipherConnection(sqlite3.Connection):
    """The store's connection: carries the `Cipher` its payload reads and writes use (or None)."""

    cipher: Cipher | None = None


def _in_use(conn: sqlite3.Connection, kid: str) -> bool:
    head = PREFIX + kid.encode() + b"."
    for table, column in (("events", "payload"), ("auth_tokens", "token"), ("window_events", "payload")):
        row = conn.execute(
            f"SELECT 1 FROM {table} WHERE substr({column}, 1, ?) = ? LIMIT 1", (len(head), head)
        ).fetchone()
        if row is not None:
            return True
    return False


def check_keys(conn: sqlite3.Connection, cipher: Cipher | None, path: Path) -> None:
    """Refuse to start (`StoreKeyMissing`, nothing written) when rows need a key that is not
    configured; then record the current key and forget recorded keys no row uses any more."""
    recorded = {kid for (kid,) in conn.execute("SELECT kid FROM store_keys")}
    configured = cipher.kids if cipher is not None else frozenset()
    unused = []
    for kid in sorted(recorded - configured):
        if _in_use(conn, kid):
            hint = (
                "set [store] encryption (key, or previous_keys during a rotation)"
                if cipher is None
                else "the configured key(s) are different: wrong key, or the old one is missing "
                "from previous_keys"
            )
            raise StoreKeyMissing(
                f"{path}: payloads in the store are encrypted with key {kid}, which is not configured; "
                f"{hint}. Nothing was changed."
            )
        unused.append(kid)
    if cipher is None and not unused:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("DELETE FROM store_keys WHERE kid = ?", [(kid,) for kid in unused])
        if cipher is not None:
            conn.execute(
                "INSERT OR IGNORE INTO store_keys(kid, added_at) VALUES (?, ?)", (cipher.kid, time.time())
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
