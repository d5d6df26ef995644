"""The group-commit engine both backends share: one writer thread, one connection, groups of requests.

Group commit:
    One thread owns the write connection. It takes every request waiting in its queue (up to
    `max_batch`), runs them all in one transaction, commits once, then answers each. If one
    request raises, the whole group is rolled back and each request is re-run in a transaction
    of its own, so one bad request fails alone. A failed commit (disk full, I/O error, server
    gone) fails every request in the group with `StoreUnavailable`; nothing in it was
    acknowledged. When the backend says so (SQLite's full disk), the group's requests are then
    retried one by one, so reads (and writes that fit) still succeed while the others fail alone.

Outages:
    `call` fails fast (a webhook answers 503); `call_until_committed` waits the outage out with
    capped backoff, for the stages that have nobody to answer and must neither crash-loop nor
    forget an outcome. Both recover by themselves once a commit succeeds again (a backend whose
    connection can break, PostgreSQL, reconnects in `Transactions.connection`).

Wake-ups:
    Requests name the consumers their writes concern (`wake`). After the commit the engine fires
    those consumers' `Signal`s, only for requests that committed. A backend shared by several
    processes (PostgreSQL) also `announce`s the names inside the transaction, so the other nodes
    hear of the commit when it happens (`daemon.store.postgres.wake`, `.listener`).

Cancellation:
    A trio task cancelled while waiting for its request stops waiting, but the request itself
    still runs and commits (a transaction cannot be half-sent). Callers that acknowledge must
    therefore be idempotent on retry, which the webhook's idempotency keys and the sinks'
    delivery ids provide.

What is backend-specific is the `Transactions` a backend hands in: how to get the connection,
begin, commit and roll back, and which exceptions are a request's own fault.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import trio

from daemon.errors import StoreUnavailable
from daemon.store.api import Signal

log = logging.getLogger("ferry.store")
T = TypeVar("T")
C = TypeVar("C")

READY_HOLD_SECONDS = 1.0
"""How long after a failed commit the store still counts as not writable (see `writable`)."""
_STOP = object()


class Failure(Enum):
    """What an exception raised inside a group means (`Transactions.classify`)."""

    REQUEST = "request"
    """The request's own fault (a bad value, a constraint): it fails alone."""
    UNAVAILABLE = "unavailable"
    """The store cannot commit now: the group fails with `StoreUnavailable`."""
    EACH = "each"
    """The store cannot commit this group (a full disk): retry its requests one by one."""


class Transactions(Protocol[C]):
    """What the engine needs of a backend; every method runs on the writer thread."""

    def connection(self) -> C:
        """The connection for the next group; raises `StoreUnavailable` when there is none now."""
        ...

    def begin(self, conn: C) -> None: ...

    def commit(self, conn: C) -> None: ...

    def rollback(self, conn: C) -> None:
        """Roll back; must not raise."""
        ...

    def classify(self, exc: Exception) -> Failure: ...

    @property
    def announces(self) -> bool:
        """Whether other processes share this store and hear of commits (`announce`)."""
        ...

    def announce(self, conn: C, consumers: set[str]) -> None:
        """Inside the transaction: tell the other processes, on its commit, whom it concerns."""
        ...


class _Request(Generic[C, T]):
    __slots__ = ("done", "error", "fn", "result", "wake")

    def __init__(self, fn: Callable[[C], T], wake: Collection[str]) -> None:
        self.fn = fn
        self.wake = wake
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[C]):
    """The writer: `await nursery.start(engine.run)`, then `call(fn)` / `call_until_committed(fn)`.

    `fn(conn)` runs on the writer thread inside a group transaction. Backends subclass this and
    set `_transactions` before `run`.
    """

    _transactions: Transactions[C] | None

    def __init__(self, *, max_batch: int = 4096, thread_name: str = "ferry-store-writer") -> None:
        self._max_batch = max_batch
        self._thread_name = thread_name
        self._transactions = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._signals: dict[str, Signal] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.commits = 0
        self.requests = 0
        self._committing = False
        self._failed_at = -READY_HOLD_SECONDS

    def signal(self, consumer: str) -> Signal:
        """The wake-up `Signal` of a consumer (created on first use)."""
        signal = self._signals.get(consumer)
        if signal is None:
            signal = self._signals[consumer] = Signal()
        return signal

    async def call(self, fn: Callable[[C], T], *, wake: Collection[str] = ()) -> T:
        """Run `fn(conn)` in the next group transaction; return its result once committed.

        Raises `StoreUnavailable` if the transaction did not commit (nothing of
        it is durable), or whatever `fn` raised (its writes are rolled back).
        """
        if self._token is None or self._stopping:
            raise StoreUnavailable("the store is not running")
        request: _Request[C, T] = _Request(fn, wake)
        self._queue.put(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    async def call_until_committed(
        self, fn: Callable[[C], T], *, wake: Collection[str] = (), max_backoff: float = 5.0
    ) -> T:
        """`call(fn)`, retried while the store is unavailable until it commits.

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
        transactions = self._transactions
        if transactions is None:
            raise StoreUnavailable("Store.open() was not called")
        self._token = trio.lowlevel.current_trio_token()
        self._stopping = False
        done = trio.Event()
        token = self._token

        def writer() -> None:
            try:
                self._write_loop(transactions)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        self._thread = threading.Thread(target=writer, name=self._thread_name, daemon=True)
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

    # -- writer thread -------------------------------------------------------------------------

    def _write_loop(self, transactions: Transactions[C]) -> None:
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
            self._run_group(transactions, batch)
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._resolve, batch)
            except trio.RunFinishedError:
                return

    def _run_group(self, tx: Transactions[C], batch: list[_Request[C, Any]]) -> None:
        try:
            conn = tx.connection()
        except StoreUnavailable as exc:
            self._fail(batch, exc)
            return
        try:
            tx.begin(conn)
            for request in batch:
                request.result = request.fn(conn)
            if tx.announces:
                _announce(tx, conn, batch)
            tx.commit(conn)
        except Exception as exc:
            tx.rollback(conn)
            failure = tx.classify(exc)
            if failure is Failure.EACH and len(batch) > 1:
                self._run_each(tx, batch)
            elif failure is not Failure.REQUEST:
                self._fail(batch, exc)
            elif len(batch) == 1:
                batch[0].result, batch[0].error = None, exc
            else:
                self._run_each(tx, batch)
        else:
            self._committing = True
        self.commits += 1
        self.requests += len(batch)

    def _run_each(self, tx: Transactions[C], batch: list[_Request[C, Any]]) -> None:
        for request in batch:
            request.result = None
            try:
                conn = tx.connection()
            except StoreUnavailable as exc:
                self._fail([request], exc)
                continue
            try:
                tx.begin(conn)
                request.result = request.fn(conn)
                if tx.announces:
                    _announce(tx, conn, [request])
                tx.commit(conn)
            except Exception as exc:
                tx.rollback(conn)
                if tx.classify(exc) is Failure.REQUEST:
                    request.error = exc
                else:
                    self._fail([request], exc)

    def _fail(self, batch: list[_Request[C, Any]], exc: Exception) -> None:
        self._committing = False
        self._failed_at = time.monotonic()
        log.error("store commit failed", extra={"fields": {"error": str(exc), "requests": len(batch)}})
        message = str(exc) if isinstance(exc, StoreUnavailable) else f"store write failed: {exc}"
        for request in batch:
            request.result = None
            request.error = StoreUnavailable(message)

    def _resolve(self, batch: list[_Request[C, Any]]) -> None:
        signals = self._signals
        for request in batch:
            request.done.set()
            if request.error is None:
                for consumer in request.wake:
                    signal = signals.get(consumer)
                    if signal is not None:
                        signal.fire()


def _announce(tx: Transactions[C], conn: C, batch: list[_Request[C, Any]]) -> None:
    consumers = {consumer for request in batch for consumer in request.wake}
    if consumers:
        tx.announce(conn, consumers)
