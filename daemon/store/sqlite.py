"""The SQLite outbox: the one durable boundary between every stage.

Durability:
    WAL mode, `synchronous=FULL` unless `durability = "normal"`. A call returns
    only after the transaction holding its writes has committed, so a caller
    that acknowledges after `await store.call(...)` never acknowledges
    something a crash can take back.

Group commit:
    One thread owns the only connection. It takes every request waiting in its
    queue (up to `max_batch`), runs them all in one transaction, commits once,
    then answers each. If one request raises, the whole group is rolled back
    and each request is re-run in a transaction of its own, so one bad request
    fails alone. A failed commit (disk full, I/O error) fails every request in
    the group with `StoreUnavailable`; nothing in it was acknowledged. On a full
    disk the group's requests are then retried one by one, so reads (and writes
    that fit) still succeed while writes that need space fail alone.

Outages:
    `call` fails fast (a webhook answers 503); `call_until_committed` waits the
    outage out with capped backoff, for the stages that have nobody to answer
    and must neither crash-loop nor forget an outcome while the disk is full.
    Both recover by themselves once a commit succeeds again.

Wake-ups:
    Requests name the consumers their writes concern (`wake`). After the
    commit the store fires those consumers' `Signal`s; consumers then read
    their rows back from the store in order. Memory never holds the only copy
    of anything, and a busy consumer costs no memory: its rows wait on disk.

Cancellation:
    A trio task cancelled while waiting for its request stops waiting, but the
    request itself still runs and commits (a transaction cannot be half-sent).
    Callers that acknowledge must therefore be idempotent on retry, which the
    webhook's idempotency keys and the sinks' delivery ids provide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar, final

import trio

from daemon.errors import StoreCorrupt, StoreUnavailable
from daemon.store.api import Outbox, Signal
from daemon.store.at_rest import Cipher, CipherConnection, check_keys
from daemon.store.schema import APPLICATION_ID, MIGRATIONS
from daemon.store.sqlite_ops import SqliteOperations

log = logging.getLogger("ferry.store")
T = TypeVar("T")
Connection = sqlite3.Connection


class _Request(Generic[T]):
    __slots__ = ("done", "error", "fn", "result", "wake")

    def __init__(self, fn: Callable[[Connection], T], wake: Iterable[str]) -> None:
        self.fn = fn
        self.wake = wake
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


PAGE_CACHE_KIB = 4096
"""SQLite's page cache, per connection. It fills as the database grows, so it is the daemon's
resident memory that grows with a backlog; at 4 MiB it is full after ~20,000 events, and a bigger
one measured no faster (ingest, drain: docs/reliability.md#memory-during-an-outage). The kernel's
file cache holds the rest of the hot pages."""

_STOP = object()
READY_HOLD_SECONDS = 1.0
"""How long after a failed commit the store still counts as not writable (see `Store.writable`)."""


@final
class Store(SqliteOperations):
    """The outbox. Open with `Store.open(path, ...)`, serve with `await nursery.start(store.run)`.

    Components use its domain operations (`daemon.store.api.Outbox`, implemented in
    `daemon.store.sqlite_ops`); each runs its store function `fn(conn)` through `call` (or
    `call_until_committed`) on the writer thread, inside a group transaction. Tests may call
    `store.call(fn)` directly; nothing outside `daemon/store/` does.
    """

    def __init__(
        self, path: Path, *, durability: str = "full", max_batch: int = 4096, cipher: Cipher | None = None
    ) -> None:
        self.path = path
        self._durability = durability
        self._cipher = cipher
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._signals: dict[str, Signal] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._stopping = False
        self.commits = 0
        self.requests = 0
        self._committing = False
        self._failed_at = -READY_HOLD_SECONDS

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
        return store

    def signal(self, consumer: str) -> Signal:
        """The wake-up `Signal` of a consumer (created on first use)."""
        signal = self._signals.get(consumer)
        if signal is None:
            signal = self._signals[consumer] = Signal()
        return signal

    async def call(self, fn: Callable[[Connection], T], *, wake: Iterable[str] = ()) -> T:
        """Run `fn(conn)` in the next group transaction; return its result once committed.

        Raises `StoreUnavailable` if the transaction did not commit (nothing of
        it is durable), or whatever `fn` raised (its writes are rolled back).
        """
        if self._token is None or self._stopping:
            raise StoreUnavailable("the store is not running")
        request = _Request(fn, wake)
        self._queue.put(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    async def call_until_committed(
        self, fn: Callable[[Connection], T], *, wake: Iterable[str] = (), max_backoff: float = 5.0
    ) -> T:
        """`call(fn)`, retried while the store is unavailable (disk full, I/O error) until it commits.

        Each try runs `fn` in a fresh transaction (a failed one left nothing behind). Waits
        0.05 s after the first failure, doubling up to `max_backoff`. Raises `StoreUnavailable`
        once the store is stopping, and whatever `fn` raised.
        """
        delay = 0.05
        while True:
            try:
                return await self.call(fn, wake=wake)
            except StoreUnavailable:
                if self._token is None or self._stopping:
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, max_backoff)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until cancelled; requests already queued are still committed."""
        if self._conn is None:
            raise StoreUnavailable("Store.open() was not called")
        self._token = trio.lowlevel.current_trio_token()
        self._stopping = False
        done = trio.Event()
        token = self._token

        def writer() -> None:
            try:
                self._write_loop()
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        self._thread = threading.Thread(target=writer, name="ferry-store-writer", daemon=True)
        self._thread.start()
        self._committing = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            # Refuse new calls from here on: a request queued behind _STOP would never be answered.
            self._stopping = True
            self._queue.put(_STOP)
            with trio.CancelScope(shield=True):
                await done.wait()
            self._token = None

    @property
    def writable(self) -> bool:
        """Whether the last commit succeeded and none has failed for `READY_HOLD_SECONDS`.

        Readiness (`/readyz`, READY) follows this. On a nearly full disk a small commit (a sink's
        bookkeeping) can succeed between failing event inserts; the hold keeps readiness from
        flapping with them.
        """
        return self._committing and time.monotonic() - self._failed_at >= READY_HOLD_SECONDS

    def close(self) -> None:
        """Close the connection (after `run` has returned)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writer thread -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            first = get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run_group(conn, batch)
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._resolve, batch)
            except trio.RunFinishedError:
                return

    def _run_group(self, conn: Connection, batch: list[_Request[Any]]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for request in batch:
                request.result = request.fn(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            if isinstance(exc, sqlite3.Error) and not _is_request_error(exc):
                if len(batch) > 1 and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    self._run_each(conn, batch)
                else:
                    self._fail(batch, exc)
            elif len(batch) == 1:
                batch[0].result, batch[0].error = None, exc
            else:
                self._run_each(conn, batch)
        else:
            self._committing = True
        self.commits += 1
        self.requests += len(batch)

    def _run_each(self, conn: Connection, batch: list[_Request[Any]]) -> None:
        for request in batch:
            request.result = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                request.result = request.fn(conn)
                conn.execute("COMMIT")
            except Exception as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error) and not _is_request_error(exc):
                    self._fail([request], exc)
                else:
                    request.error = exc

    def _fail(self, batch: list[_Request[Any]], exc: sqlite3.Error) -> None:
        self._committing = False
        self._failed_at = time.monotonic()
        log.error("store commit failed", extra={"fields": {"error": str(exc), "requests": len(batch)}})
        for request in batch:
            request.result = None
            request.error = StoreUnavailable(f"store write failed: {exc}")

    def _resolve(self, batch: list[_Request[Any]]) -> None:
        signals = self._signals
        for request in batch:
            request.done.set()
            if request.error is None:
                for consumer in request.wake:
                    signal = signals.get(consumer)
                    if signal is not None:
                        signal.fire()


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
