"""Connections to the PostgreSQL outbox: open, migrate, check the schema, reconnect with backoff.

Timeouts (every external call has one):
    `connect_timeout` bounds a connection attempt; `statement_timeout` and `lock_timeout` bound
    each statement on the server; `tcp_user_timeout` and TCP keepalives bound a write or a wait
    to a server that vanished without closing the connection (a cut network); the writer thread
    is never stuck longer than these. `synchronous_commit` is on: a commit returns once the
    server has flushed it, so 202 means durable. `idle_in_transaction_session_timeout` (10 s)
    ends the transaction of a node cut off mid-group, so the locks it held (the events lock:
    every node's ingest) are free again within that bound.

Outages:
    A connection that breaks (server restarted, `pg_terminate_backend`, network cut) is closed,
    and every request of the group fails with `StoreUnavailable`. The next group reconnects; while
    the server stays unreachable, attempts back off (0.1 s doubling to `MAX_BACKOFF`), and a group
    that arrives before the next attempt is due fails at once rather than waiting for a timeout, so
    webhooks answer 503 quickly. The store recovers by itself when the server returns.

Schema:
    `open_database` runs the missing migrations once, under `pg_advisory_lock(SCHEMA_LOCK)` (so two
    nodes starting together never race), each in its own transaction with its version row. A
    database whose version is newer than this code's is refused (`StoreCorrupt`, exit 2), and so
    is one that holds tables but no `ferry_schema` (not ferry's), left untouched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, final

import psycopg
import psycopg.errors

from daemon.errors import SchemaMismatch, StoreCorrupt, StoreKeyMissing, StoreUnavailable
from daemon.store.at_rest import PREFIX, Cipher
from daemon.store.engine import Failure
from daemon.store.postgres import wake
from daemon.store.postgres.schema import MIGRATIONS, SCHEMA_LOCK, VERSION

log = logging.getLogger("ferry.store")

CONNECT_TIMEOUT = 5
"""Seconds a connection attempt may take."""
STATEMENT_TIMEOUT_MS = 30_000
"""Longest a statement may run on the server (a prune, a big group)."""
LOCK_TIMEOUT_MS = 10_000
"""Longest a statement waits for a row or advisory lock another node holds."""
TCP_USER_TIMEOUT_MS = 15_000
"""How long sent data may stay unacknowledged before the connection counts as broken."""
MAX_BACKOFF = 5.0
"""Most seconds between reconnection attempts while the server is unreachable."""


@final
class Db:
    """One connection as the store functions see it: the psycopg connection, the cipher of
    `[store] encryption` (or None), and this node's id and lease length for claims."""

    __slots__ = ("cipher", "conn", "events_locked", "lease", "node", "pipeline")

    def __init__(self, conn: psycopg.Connection[Any], cipher: Cipher | None, node: str, lease: float) -> None:
        self.conn = conn
        self.cipher = cipher
        self.node = node
        self.lease = lease
        self.pipeline: psycopg.Pipeline | None = None
        """The group's pipeline: statements whose results are not read go out without waiting."""
        self.events_locked = False
        """Whether this transaction holds the events lock (`outbox.lock_events`)."""

    def execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Queue a statement (sent at once, its result read when asked for: a round trip then)."""
        return self.conn.execute(sql, params)

    def count(self, sql: str, params: Any = None) -> int:
        """Run a statement and return how many rows it changed (a round trip: the count needs it)."""
        cursor = self.conn.execute(sql, params)
        if self.pipeline is not None:
            self.pipeline.sync()
        return cursor.rowcount

    def executemany(self, sql: str, rows: Any) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(sql, rows)


def describe(url: str) -> str:
    """The database as messages and logs name it: `database HOST:PORT/NAME`, no user, no password
    (not the URL itself: the log redactor masks the configured URL, a secret, wherever it appears)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured database (its URL does not parse)"
    host, port, dbname = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
    return f"database {host}:{port}/{dbname}"


def connect(url: str, *, node: str) -> psycopg.Connection[Any]:
    """A new connection with the store's timeouts and settings; `StoreUnavailable` if none."""
    options = (
        f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS} "
        "-c synchronous_commit=on -c idle_in_transaction_session_timeout=10000"
    )
    try:
        return psycopg.connect(
            url,
            connect_timeout=CONNECT_TIMEOUT,
            options=options,
            application_name=f"ferry {node}"[:63],
            tcp_user_timeout=TCP_USER_TIMEOUT_MS,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            autocommit=False,
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(f"{describe(url)}: cannot connect ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The database's schema version; None when it has no `ferry_schema` table."""
    row = conn.execute("SELECT to_regclass('ferry_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    found = conn.execute("SELECT max(version) FROM ferry_schema").fetchone()
    return int(found[0]) if found and found[0] is not None else 0


def open_database(url: str, *, node: str, cipher: Cipher | None) -> psycopg.Connection[Any]:
    """Connect, migrate under the schema lock, check the version and the keys; the connection.

    Raises `StoreUnavailable` (cannot connect), `StoreCorrupt` (not ferry's, or a newer schema)
    or `StoreKeyMissing` (rows encrypted with a key that is not configured).
    """
    conn = connect(url, node=node)
    where = describe(url)
    try:
        conn.autocommit = True
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            migrate(conn, where)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        conn.autocommit = False
        _check_keys(conn, cipher, where)
    except psycopg.Error as exc:
        conn.close()
        raise StoreUnavailable(f"{where}: {_first_line(exc)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(
    conn: psycopg.Connection[Any], where: str, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> None:
    """Run the missing ones of `migrations` (this code's; a test passes fewer to make the database
    an older version leaves), each in a transaction of its own with its version row. The caller
    holds the schema lock, in autocommit mode. Refuses a newer or a foreign database."""
    latest = len(migrations)
    version = schema_version(conn)
    if version is None:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()
        if tables and tables[0]:
            raise StoreCorrupt(
                f"{where}: the database holds tables but is not a ferry outbox (no ferry_schema); "
                "it was left untouched: point [store] url at an empty database"
            )
        conn.execute("CREATE TABLE ferry_schema (version integer PRIMARY KEY, applied_at double precision)")
        version = 0
    if version > latest:
        raise SchemaMismatch(
            f"{where}: database schema version {version} is newer than this ferry ({latest}); "
            "the database was left untouched: run the newer ferry that wrote it on every node"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        with conn.transaction():
            for statement in script:
                conn.execute(statement)
            conn.execute("INSERT INTO ferry_schema VALUES (%s, %s)", (number, time.time()))
        log.info("store migrated", extra={"fields": {"version": number, "database": where}})


def check_version(conn: psycopg.Connection[Any], where: str) -> None:
    """Refuse a database whose schema is not the one this code writes (after a reconnect too)."""
    version = schema_version(conn)
    conn.rollback()
    if version != VERSION:
        raise SchemaMismatch(
            f"{where}: database schema version {version} does not match this ferry's ({VERSION}); "
            "run the same ferry version on every node"
        )


def _check_keys(conn: psycopg.Connection[Any], cipher: Cipher | None, where: str) -> None:
    """`[store] encryption`'s start-up check (as SQLite's `check_keys`): refuse to start when rows
    need a key that is not configured; record the current key; forget keys no row uses."""
    with conn.transaction():
        recorded = {str(kid) for (kid,) in conn.execute("SELECT kid FROM store_keys").fetchall()}
        configured = cipher.kids if cipher is not None else frozenset()
        for kid in sorted(recorded - configured):
            head = PREFIX + kid.encode() + b"."
            used = any(
                conn.execute(
                    f"SELECT 1 FROM {table} WHERE substr({column}, 1, %s) = %s LIMIT 1",
                    (len(head), head),
                ).fetchone()
                for table, column in (
                    ("events", "payload"),
                    ("auth_tokens", "token"),
                    ("window_events", "payload"),
                )
            )
            if used:
                raise StoreKeyMissing(
                    f"{where}: payloads in the store are encrypted with key {kid}, which is not configured; "
                    "set [store] encryption (key, or previous_keys during a rotation). Nothing was changed."
                )
            conn.execute("DELETE FROM store_keys WHERE kid = %s", (kid,))
        if cipher is not None:
            conn.execute(
                "INSERT INTO store_keys(kid, added_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (cipher.kid, time.time()),
            )


@final
class PostgresTransactions:
    """The engine's PostgreSQL half (`daemon.store.engine.Transactions`): a connection that is
    re-opened with backoff when it breaks; runs on the writer thread only."""

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[Any] | None,
        *,
        cipher: Cipher | None,
        node: str,
        lease: float,
    ) -> None:
        self._url = url
        self._where = describe(url)
        self._cipher, self._node, self._lease = cipher, node, lease
        self._db: Db | None = None if conn is None else Db(conn, cipher, node, lease)
        self._delay = 0.0
        self._next_try = 0.0
        self._stack: contextlib.ExitStack | None = None
        self.reconnects = 0

    def connection(self) -> Db:
        db = self._db
        if db is not None and not db.conn.closed and not db.conn.broken:
            return db
        self._drop()
        now = time.monotonic()
        if now < self._next_try:
            raise StoreUnavailable(
                f"{self._where}: unreachable; next connection attempt in {self._next_try - now:.1f} s"
            )
        try:
            conn = connect(self._url, node=self._node)
            try:
                check_version(conn, self._where)
            except BaseException:
                conn.close()
                raise
        except (StoreUnavailable, psycopg.Error) as exc:
            self._delay = min(max(self._delay * 2, 0.1), MAX_BACKOFF)
            self._next_try = time.monotonic() + self._delay
            raise StoreUnavailable(str(exc)) from None
        except StoreCorrupt as exc:
            self._next_try = time.monotonic() + MAX_BACKOFF
            raise StoreUnavailable(str(exc)) from None
        self._delay = 0.0
        self.reconnects += 1
        log.info("store reconnected", extra={"fields": {"database": self._where}})
        self._db = Db(conn, self._cipher, self._node, self._lease)
        return self._db

    def begin(self, conn: Db) -> None:
        """Open the group's pipeline; psycopg opens the transaction with the first statement.

        In a pipeline a statement is sent without waiting for its result, so a group costs a
        round trip only where a request reads a result (a lookup, a fetch) and at its commit.
        An error then surfaces at the next read or at the commit, possibly in another request
        of the group; the engine re-runs the group's requests one by one, so it still fails alone.
        """
        stack = contextlib.ExitStack()
        conn.pipeline = stack.enter_context(conn.conn.pipeline())
        self._stack = stack

    def commit(self, conn: Db) -> None:
        conn.conn.commit()
        self._end(conn)

    def rollback(self, conn: Db) -> None:
        self._end(conn)
        with contextlib.suppress(psycopg.Error):
            conn.conn.rollback()

    def _end(self, conn: Db) -> None:
        conn.pipeline = None
        conn.events_locked = False
        stack, self._stack = self._stack, None
        if stack is not None:
            with contextlib.suppress(psycopg.Error):
                stack.close()

    announces = True
    """Other nodes share the database: commits that wake someone tell them (`wake.announce`)."""

    def announce(self, conn: Db, consumers: set[str]) -> None:
        wake.announce(conn.conn, self._node, consumers)

    def classify(self, exc: Exception) -> Failure:
        if not isinstance(exc, psycopg.Error):
            return Failure.REQUEST
        if isinstance(exc, psycopg.errors.TransactionRollback):
            return Failure.EACH  # a deadlock or serialization failure between nodes: run alone
        if isinstance(exc, psycopg.IntegrityError | psycopg.DataError | psycopg.ProgrammingError):
            return Failure.REQUEST
        db = self._db
        if db is not None and (db.conn.closed or db.conn.broken):
            self._drop()
        return Failure.UNAVAILABLE

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.conn.close()
            self._db = None

    def close(self) -> None:
        self._drop()
