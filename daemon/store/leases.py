"""PostgreSQL coordination of a cluster's nodes: heartbeats, fenced leases, pauses and drains.

Implements `daemon.store.coordination.Coordination` (its guarantees are stated there) on a
connection of its own, used from one worker thread at a time: coordination is a few small
statements per heartbeat, and it must not wait behind a backlog of group commits (a lease that
cannot be renewed because ingest is busy would fail over a healthy node).

Tables (the outbox's migration 3, `daemon.store.postgres.schema`: a node that opened its store
has them; on a database no node has migrated, every call fails with `StoreUnavailable`):
    ferry_nodes   (id, host, address, pid, started_at, heartbeat_at)
    ferry_leases  (name, holder, token, expires_at, acquired_at): token only ever grows
    ferry_pauses  (name, paused_at, by_node): sources and sinks paused cluster-wide
    ferry_drains  (number, by_node, started_at, until, done_at)

Timeouts: connecting and every transaction are bounded by `timeout` (libpq's connect_timeout and
tcp_user_timeout, the server's statement_timeout), and the trio side stops waiting after
`timeout` too; a connection that failed or was abandoned is dropped and opened again at the
next call. Every error becomes `StoreUnavailable`, except a refused drain (`ValueError`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar, final

import psycopg
import trio

from daemon.errors import StoreUnavailable
from daemon.store.coordination import Beat, Drain, LeaseRow, NodeInfo, NodeRow

log = logging.getLogger("ferry.cluster")
T = TypeVar("T")

FORGET_AFTER: Final = 3600.0
"""A node dead for this long is removed from `ferry_nodes`."""

_HEARTBEAT = """INSERT INTO ferry_nodes AS n (id, host, address, pid) VALUES (%s, %s, %s, %s)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), host = excluded.host,
        address = excluded.address, pid = excluded.pid"""
_FORGET = "DELETE FROM ferry_nodes WHERE heartbeat_at < now() - make_interval(secs => %s)"
_RENEW = """UPDATE ferry_leases AS l SET expires_at = now() + make_interval(secs => %s)
    FROM unnest(%s::text[], %s::bigint[]) AS h(name, token)
    WHERE l.name = h.name AND l.token = h.token AND l.holder = %s AND l.expires_at > now()
    RETURNING l.name, l.token"""
_ACQUIRE = """INSERT INTO ferry_leases AS l (name, holder, token, expires_at)
    SELECT w, %s, 1, now() + make_interval(secs => %s) FROM unnest(%s::text[]) AS w
    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = l.token + 1,
        expires_at = excluded.expires_at, acquired_at = now()
    WHERE l.expires_at <= now() OR l.holder IS NULL OR l.holder = excluded.holder
    RETURNING l.name, l.token"""
_EXISTING = "SELECT name FROM ferry_leases WHERE name = ANY(%s)"
_TAKEABLE = """SELECT name FROM ferry_leases
    WHERE name = ANY(%s) AND (expires_at <= now() OR holder IS NULL OR holder = %s)
    FOR UPDATE SKIP LOCKED"""
_PAUSES = "SELECT name FROM ferry_pauses"
_DRAIN = """SELECT number, done_at IS NULL AND until > now(), done_at IS NOT NULL
    FROM ferry_drains ORDER BY number DESC LIMIT 1"""
_RELEASE = """UPDATE ferry_leases SET expires_at = now()
    WHERE name = %s AND holder = %s AND token = %s AND expires_at > now()"""
_LEAVE_LEASES = "UPDATE ferry_leases SET expires_at = now() WHERE holder = %s AND expires_at > now()"
_LEAVE_NODE = "DELETE FROM ferry_nodes WHERE id = %s"
_PUBLISH = (
    "INSERT INTO ferry_node_metrics (node, published_at, snapshot) VALUES (%s, now(), %s) "
    "ON CONFLICT (node) DO UPDATE SET published_at = now(), snapshot = EXCLUDED.snapshot"
)
_FORGET_METRICS = "DELETE FROM ferry_node_metrics WHERE published_at < now() - make_interval(secs => %s)"
_METRICS = (
    "SELECT node, snapshot FROM ferry_node_metrics WHERE published_at >= now() - make_interval(secs => %s)"
)
_NODES = """SELECT n.id, n.host, n.address, n.pid, extract(epoch FROM n.started_at)::float8,
        extract(epoch FROM n.heartbeat_at)::float8, extract(epoch FROM now() - n.heartbeat_at)::float8,
        coalesce(array_agg(l.name ORDER BY l.name) FILTER (WHERE l.name IS NOT NULL), '{}')
    FROM ferry_nodes AS n LEFT JOIN ferry_leases AS l ON l.holder = n.id AND l.expires_at > now()
    WHERE n.heartbeat_at >= now() - make_interval(secs => %s)
    GROUP BY n.id ORDER BY n.id"""
_LEASES = """SELECT name, holder, token, extract(epoch FROM expires_at - now())::float8
    FROM ferry_leases ORDER BY name"""
_PAUSE = """INSERT INTO ferry_pauses (name, by_node) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING
    RETURNING name"""
_RESUME = "DELETE FROM ferry_pauses WHERE name = %s RETURNING name"
_ACTIVE_DRAIN = "SELECT number FROM ferry_drains WHERE done_at IS NULL AND until > now() FOR UPDATE"
_START_DRAIN = """INSERT INTO ferry_drains (by_node, until) VALUES (%s, now() + make_interval(secs => %s))
    RETURNING number"""
_FINISH_DRAIN = "UPDATE ferry_drains SET done_at = now() WHERE number = %s AND done_at IS NULL"


@final
class PostgresCoordination:
    """`Coordination` on its own PostgreSQL connection; see the module docstring."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._url = url
        self._timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = trio.Lock()
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PostgresCoordination {'connected' if self._conn is not None else 'idle'}>"

    def _connect(self) -> psycopg.Connection[Any]:
        ms = max(1, int(self._timeout * 1000))
        return psycopg.connect(
            self._url,
            connect_timeout=max(1, round(self._timeout)),
            tcp_user_timeout=ms,
            options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
            application_name="ferry-cluster",
        )

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`fn(conn)` in one transaction on the worker thread, within the timeout."""

        def work() -> T:
            with self._thread_lock:  # an abandoned call still running holds the connection
                conn = self._conn
                if conn is None or conn.closed:
                    conn = self._conn = self._connect()
                try:
                    with conn.transaction():
                        return fn(conn)
                except psycopg.Error:
                    self._conn = None  # broken or abandoned: the next call connects again
                    conn.close()
                    raise

        async with self._lock:
            try:
                with trio.fail_after(self._timeout * 2 + 1):
                    return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
            except trio.TooSlowError:
                raise StoreUnavailable("the database did not answer in time") from None
            except psycopg.Error as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StoreUnavailable(f"database: {first}") from exc

    async def beat(self, node: NodeInfo, held: Mapping[str, int], wanted: Sequence[str], ttl: float) -> Beat:
        names, tokens = list(held), [held[name] for name in held]

        def fn(conn: psycopg.Connection[Any]) -> Beat:
            conn.execute(_HEARTBEAT, (node.id, node.host, node.address, node.pid))
            renewed = dict(conn.execute(_RENEW, (ttl, names, tokens, node.id)).fetchall()) if names else {}
            take = self._takeable(conn, node, held, wanted)
            granted = dict(conn.execute(_ACQUIRE, (node.id, ttl, take)).fetchall()) if take else {}
            paused = frozenset(row[0] for row in conn.execute(_PAUSES))
            row = conn.execute(_DRAIN).fetchone()
            drain = Drain(*row) if row is not None else None
            return Beat(granted, renewed, paused, drain)

        return await self._run(fn)

    @staticmethod
    def _takeable(
        conn: psycopg.Connection[Any], node: NodeInfo, held: Mapping[str, int], wanted: Sequence[str]
    ) -> list[str]:
        """Which of `wanted` to take now: new names, and free ones locked `FOR UPDATE` here.

        The lock is what orders a takeover against the old holder's commit in flight (which holds
        the row `FOR KEY SHARE`, `daemon.store.fencing`); a row such a commit holds is skipped and
        tried again at the next beat, so a heartbeat never waits on another node's commit."""
        want = [name for name in wanted if name not in held]
        if not want:
            return []
        existing = {row[0] for row in conn.execute(_EXISTING, (want,))}
        lockable = {row[0] for row in conn.execute(_TAKEABLE, (want, node.id))}
        return [name for name in want if name not in existing or name in lockable]

    async def release(self, node_id: str, name: str, token: int) -> None:
        await self._run(lambda conn: conn.execute(_RELEASE, (name, node_id, token)))

    async def nodes(self, dead_after: float) -> list[NodeRow]:
        def fn(conn: psycopg.Connection[Any]) -> list[NodeRow]:
            conn.execute(_FORGET, (FORGET_AFTER,))
            rows = conn.execute(_NODES, (FORGET_AFTER,)).fetchall()
            return [
                NodeRow(id_, host, address, pid, started, beat, age, age <= dead_after, list(held))
                for id_, host, address, pid, started, beat, age, held in rows
            ]

        return await self._run(fn)

    async def leases(self) -> list[LeaseRow]:
        return await self._run(lambda conn: [LeaseRow(*row) for row in conn.execute(_LEASES)])

    async def set_paused(self, name: str, paused: bool, node_id: str) -> bool:
        def fn(conn: psycopg.Connection[Any]) -> bool:
            if paused:
                return conn.execute(_PAUSE, (name, node_id)).fetchone() is not None
            return conn.execute(_RESUME, (name,)).fetchone() is not None

        return await self._run(fn)

    async def start_drain(self, node_id: str, timeout: float) -> Drain:
        def fn(conn: psycopg.Connection[Any]) -> Drain:
            conn.execute("LOCK TABLE ferry_drains IN EXCLUSIVE MODE")
            active = conn.execute(_ACTIVE_DRAIN).fetchone()
            if active is not None:
                raise ValueError(f"drain {active[0]} is already under way")
            (number,) = conn.execute(_START_DRAIN, (node_id, timeout)).fetchone() or (0,)
            return Drain(number, active=True, done=False)

        return await self._run(fn)

    async def finish_drain(self, number: int) -> None:
        await self._run(lambda conn: conn.execute(_FINISH_DRAIN, (number,)))

    async def leave(self, node_id: str) -> None:
        def fn(conn: psycopg.Connection[Any]) -> None:
            conn.execute(_LEAVE_LEASES, (node_id,))
            conn.execute(_LEAVE_NODE, (node_id,))

        await self._run(fn)

    async def publish_metrics(self, node_id: str, snapshot: bytes) -> None:
        def fn(conn: psycopg.Connection[Any]) -> None:
            conn.execute(_PUBLISH, (node_id, snapshot))
            conn.execute(_FORGET_METRICS, (FORGET_AFTER,))

        await self._run(fn)

    async def cluster_metrics(self, max_age: float) -> dict[str, bytes]:
        rows = await self._run(lambda conn: conn.execute(_METRICS, (max_age,)).fetchall())
        return {str(node): bytes(snapshot) for node, snapshot in rows}

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)


__all__ = ["PostgresCoordination"]
