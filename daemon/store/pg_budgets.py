"""Cluster-wide rate budgets in PostgreSQL: one row per budget, one statement per batch of permits.

Each `[rate_limits.NAME]` budget is a row of `ferry_rate_budgets` (the outbox's migration 3,
`daemon.store.postgres.schema`; a node has it once its store is open): a token bucket (`tokens` as of
`stamp`) refilled at the caller's `rate_per_s` up to its `burst`, and `blocked_until` (a server's
`Retry-After` seen by any node). `take` is one `INSERT … ON CONFLICT DO UPDATE … RETURNING`: it
creates the row full on first use, refills it up to now, and takes up to `want` permits (at most
`burst`) — those there now and those the refill pays within `AHEAD_S` (the bucket goes into debt;
the grant says when its permits may start: the virtual schedule of GCRA, so nodes that ask
together queue in the row instead of racing for each token and asking again) — and answers how
many it took, when they may start, and how long until the next — in one round trip, under the row's lock,
on the database's clock (`statement_timestamp()`, made monotonic per row by `greatest(stamp, …)`:
a node whose statement waited for the lock counts no refill from before the last grant). The
nodes' own clocks are never compared.

Guarantee: permits granted to all nodes over any interval T ≤ `burst + rate_per_s * T` (the
bucket's bound, as for one process), while every node passes the same rate and burst; during a
rolling reload that changes them each statement applies the caller's, so the bound is that of the
larger config until every node has reloaded.

Durability: the session runs with `synchronous_commit = off`. The budget is not an outbox: if
the database server crashes, the last ~0.6 s of grants (3 x `wal_writer_delay`) may be forgotten and
granted again once, which is a bounded overshoot once per server crash; in exchange no grant waits
for a WAL flush.

Timeouts: connecting (`connect_timeout`), the statement (`statement_timeout`), the row lock
(`lock_timeout`) and a dead peer (`tcp_user_timeout`) are each bounded by `timeout`; the trio side
also stops waiting after `timeout` and drops the connection. Every failure is `StoreUnavailable`;
the next call connects again.

Threads: psycopg's async API runs on asyncio only, so the blocking driver runs on a worker thread
(`trio.to_thread`), one statement at a time per connection.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final, final

import psycopg
import trio

from daemon.errors import StoreUnavailable
from daemon.store.budgets import Grant

__all__ = ["AHEAD_S", "PgBudgets"]

log = logging.getLogger("ferry.store.budgets")

AHEAD_S: Final = 0.25
"""How far ahead a grant may reserve permits: the bucket may go into debt by `rate * AHEAD_S`
tokens, and the permits are usable once it is paid (`Grant.start_in_s`)."""

# `now` below: greatest(b.stamp, statement_timestamp()) — never before the row's last update.
_NOW = "greatest(b.stamp, statement_timestamp())"
_AVAIL = f"least(%(burst)s, b.tokens + extract(epoch FROM {_NOW} - b.stamp) * %(rate)s)"
_GRANT = (
    f"CASE WHEN b.blocked_until > statement_timestamp() THEN 0 ELSE greatest(0, "
    f"least(%(want)s, %(burst)s, floor({_AVAIL} + %(rate)s * %(ahead)s + 1e-9)))::integer END"
)
_LAG = "greatest(0, extract(epoch FROM b.stamp - statement_timestamp()))"  # the row is ahead of us
_TAKE: Final = f"""
INSERT INTO ferry_rate_budgets AS b (name, tokens, stamp, last_grant, rate_per_s, burst)
VALUES (%(name)s, %(burst)s - least(%(want)s, %(burst)s), statement_timestamp(),
        least(%(want)s, %(burst)s), %(rate)s, %(burst)s)
ON CONFLICT (name) DO UPDATE SET
    tokens = {_AVAIL} - {_GRANT},
    stamp = {_NOW},
    last_grant = {_GRANT},
    rate_per_s = %(rate)s,
    burst = %(burst)s
RETURNING
    b.last_grant,
    {_LAG} + greatest(0, -b.tokens) / %(rate)s,
    {_LAG} + greatest(0, (1 - b.tokens) / %(rate)s - %(ahead)s),
    extract(epoch FROM greatest(b.blocked_until, statement_timestamp()) - statement_timestamp())
"""

_BLOCK: Final = """
INSERT INTO ferry_rate_budgets AS b (name, tokens, stamp, blocked_until, rate_per_s, burst)
VALUES (%(name)s, least(1, %(burst)s), statement_timestamp() + make_interval(secs => %(pause)s),
        statement_timestamp() + make_interval(secs => %(pause)s), %(rate)s, %(burst)s)
ON CONFLICT (name) DO UPDATE SET
    blocked_until = excluded.blocked_until,
    tokens = 1,
    stamp = greatest(b.stamp, excluded.stamp)
WHERE excluded.blocked_until > b.blocked_until
RETURNING b.name
"""


@final
class PgBudgets:
    """`daemon.store.budgets.Budgets` on one PostgreSQL connection of its own (not the outbox's).

    Open with `PgBudgets(url)`; it connects on first use and again after any failure.
    """

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be more than 0")
        self._url = url
        self._timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one statement at a time on the connection
        self._closed = False
        self.round_trips = 0
        self.errors = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn is not None else "idle"
        return f"<PgBudgets [{state} | round trips: {self.round_trips}, errors: {self.errors}]>"

    def _connect(self) -> psycopg.Connection[Any]:
        ms = int(self._timeout * 1000)
        return psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=max(1, int(self._timeout + 0.999)),
            tcp_user_timeout=ms,
            application_name="ferry budgets",
            options=f"-c statement_timeout={ms} -c lock_timeout={ms // 2} -c synchronous_commit=off",
        )

    def _execute(self, query: str, params: dict[str, object]) -> tuple[Any, ...] | None:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the budget connection is closed")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                row = self._conn.execute(query, params).fetchone()
            except psycopg.Error as exc:
                self._drop()
                raise StoreUnavailable(f"rate budget: {str(exc).strip().splitlines()[0]}") from exc
            self.round_trips += 1
            return row

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _call(self, query: str, params: dict[str, object]) -> tuple[Any, ...] | None:
        try:
            with trio.fail_after(self._timeout * 2):
                return await trio.to_thread.run_sync(self._execute, query, params, abandon_on_cancel=True)
        except trio.TooSlowError:
            # The thread is stuck on the network: it stops within tcp_user_timeout, and its connection
            # is dropped then (the statement errs); the caller grants nothing meanwhile.
            self.errors += 1
            raise StoreUnavailable(f"rate budget: no answer within {self._timeout * 2:g}s") from None
        except StoreUnavailable:
            self.errors += 1
            raise

    async def take(self, name: str, want: int, rate_per_s: float, burst: int) -> Grant:
        if want < 1 or rate_per_s <= 0 or burst < 1:
            raise ValueError(f"take({name!r}): want, rate and burst must be positive")
        params = {"name": name, "want": want, "rate": rate_per_s, "burst": burst, "ahead": AHEAD_S}
        row = await self._call(_TAKE, params)
        if row is None:  # pragma: no cover - an upsert always returns its row
            raise StoreUnavailable(f"rate budget {name!r}: no row returned")
        granted, start_in, next_in, blocked_for = int(row[0]), float(row[1]), float(row[2]), float(row[3])
        if granted:
            return Grant(granted, start_in, 0.0, blocked_for)
        return Grant(0, 0.0, max(next_in, blocked_for), blocked_for)

    async def block(self, name: str, pause_s: float, rate_per_s: float, burst: int) -> None:
        if not pause_s > 0:
            return
        await self._call(_BLOCK, {"name": name, "pause": pause_s, "rate": rate_per_s, "burst": burst})

    def close(self, timeout: float = 1.0) -> None:
        """Close from the trio thread at exit; a statement still running on a worker thread (its
        caller gave up on it) is left to its own timeout, and the connection to process exit."""
        if self._lock.acquire(timeout=timeout):
            try:
                self._closed = True
                self._drop()
            finally:
                self._lock.release()

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                self._closed = True
                self._drop()

        await trio.to_thread.run_sync(close)
