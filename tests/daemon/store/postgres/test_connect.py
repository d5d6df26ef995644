"""The PostgreSQL store's connection: migrations once under a lock, the schema version, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from daemon.errors import SchemaMismatch, StoreCorrupt, StoreUnavailable
from daemon.store.coordination import NodeInfo
from daemon.store.leases import PostgresCoordination
from daemon.store.pg_budgets import PgBudgets
from daemon.store.postgres.connect import migrate, open_database, schema_version
from daemon.store.postgres.schema import CLUSTER_TABLES, MIGRATIONS, VERSION
from daemon.store.postgres.store import PostgresStore
from daemon.store.types import Incoming
from tests.postgres import TcpProxy, pg_proxy, postgres_url

__all__ = ["pg_proxy", "postgres_url"]


def incoming(n: int) -> Incoming:
    return Incoming("hooks", msgspec.json.encode({"n": n}), None, ("crm",))


async def eventually(check: Callable[[], Any], *, within: float = 20.0) -> Any:
    """Wait for `check()` (sync or awaitable) to return something truthy, up to `within` seconds."""
    with trio.fail_after(within):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(0.05)


def test_nodes_starting_together_migrate_once(postgres_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            open_database(postgres_url, node="racer", cipher=None).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM ferry_schema ORDER BY version").fetchall() == [
            (n,) for n in range(1, VERSION + 1)
        ]
        assert schema_version(conn) == VERSION


# What the previous version (schema 2) left: its migrations, and the cluster's tables as its nodes
# created them on first use (daemon/store/leases.py and pg_budgets.py of that version).
_CREATED_ON_FIRST_USE = (
    """CREATE TABLE IF NOT EXISTS ferry_nodes (
        id text PRIMARY KEY, host text NOT NULL, address text NOT NULL, pid integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(), heartbeat_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS ferry_leases (
        name text PRIMARY KEY, holder text, token bigint NOT NULL,
        expires_at timestamptz NOT NULL, acquired_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS ferry_pauses (
        name text PRIMARY KEY, paused_at timestamptz NOT NULL DEFAULT now(), by_node text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ferry_drains (
        number bigserial PRIMARY KEY, by_node text NOT NULL, started_at timestamptz NOT NULL DEFAULT now(),
        until timestamptz NOT NULL, done_at timestamptz)""",
    """CREATE TABLE IF NOT EXISTS ferry_rate_budgets (
        name text PRIMARY KEY, tokens double precision NOT NULL, stamp timestamptz NOT NULL,
        blocked_until timestamptz NOT NULL DEFAULT '-infinity', last_grant integer NOT NULL DEFAULT 0,
        rate_per_s double precision NOT NULL, burst integer NOT NULL)""",
)


def _previous_version(url: str, *, cluster_ran: bool) -> None:
    """A database as schema 2's ferry left it, with rows: a cursor, and (`cluster_ran`) a lease
    taken seven times, a pause and a blocked budget."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, "test", MIGRATIONS[:2])
        conn.execute("INSERT INTO cursors VALUES ('shape', 41)")
        if cluster_ran:
            for statement in _CREATED_ON_FIRST_USE:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO ferry_leases (name, holder, token, expires_at) VALUES ('poll', 'a', 7, now())"
            )
            conn.execute("INSERT INTO ferry_pauses (name, by_node) VALUES ('crm', 'a')")
            conn.execute(
                "INSERT INTO ferry_rate_budgets (name, tokens, stamp, blocked_until, rate_per_s, burst) "
                "VALUES ('api', 1, now(), now() + interval '1 hour', 10, 1)"
            )
        assert schema_version(conn) == 2


@pytest.mark.parametrize("cluster_ran", [False, True], ids=["one-node", "cluster-ran"])
async def test_a_database_of_the_previous_version_is_upgraded_in_place(
    postgres_url: str, cluster_ran: bool
) -> None:
    _previous_version(postgres_url, cluster_ran=cluster_ran)
    store = PostgresStore.open(postgres_url, node="b")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            assert await store.cursor("shape") == 41
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    with psycopg.connect(postgres_url) as conn:
        assert schema_version(conn) == VERSION
        versions = [row[0] for row in conn.execute("SELECT version FROM ferry_schema ORDER BY version")]
        assert versions == list(range(1, VERSION + 1))
    # The cluster's tables are there (and what the previous version's nodes wrote in them kept).
    coordination = PostgresCoordination(postgres_url, timeout=2.0)
    budgets = PgBudgets(postgres_url)
    try:
        beat = await coordination.beat(NodeInfo("b", "host-b", "127.0.0.1:8002", 2), {}, ["poll"], ttl=5)
        assert beat.granted == {"poll": 8 if cluster_ran else 1}
        assert beat.paused == (frozenset({"crm"}) if cluster_ran else frozenset())
        grant = await budgets.take("api", 1, 10.0, 1)
        assert grant.granted == (0 if cluster_ran else 1)
    finally:
        await coordination.close()
        await budgets.aclose()


async def test_the_cluster_needs_the_migrated_schema_and_creates_nothing(postgres_url: str) -> None:
    """Coordination and budgets on a database no node's store has migrated: unavailable (the node
    opens its store first, which migrates), and no table appears behind the migrations' back."""
    coordination = PostgresCoordination(postgres_url, timeout=2.0)
    budgets = PgBudgets(postgres_url)
    try:
        with pytest.raises(StoreUnavailable, match="ferry_nodes"):
            await coordination.beat(NodeInfo("a", "host-a", "127.0.0.1:8001", 1), {}, ["poll"], ttl=5)
        with pytest.raises(StoreUnavailable, match="ferry_rate_budgets"):
            await budgets.take("api", 1, 10.0, 1)
    finally:
        await coordination.close()
        await budgets.aclose()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone() == (0,)
    open_database(postgres_url, node="a", cipher=None).close()
    with psycopg.connect(postgres_url) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        }
    assert set(CLUSTER_TABLES) <= tables


def test_a_newer_schema_is_refused_and_left_untouched(postgres_url: str) -> None:
    open_database(postgres_url, node="a", cipher=None).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO ferry_schema VALUES (%s, 0)", (VERSION + 1,))
    with pytest.raises(
        SchemaMismatch, match=rf"schema version {VERSION + 1} is newer than this ferry \({VERSION}\)"
    ):
        PostgresStore.open(postgres_url, node="a")
    with psycopg.connect(postgres_url) as conn:
        assert schema_version(conn) == VERSION + 1


def test_a_database_that_is_not_ferrys_is_refused_untouched(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id integer)")
    with pytest.raises(StoreCorrupt, match="not a ferry outbox") as info:
        PostgresStore.open(postgres_url, node="a")
    assert not isinstance(info.value, SchemaMismatch)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('ferry_schema')").fetchone() == (None,)


def test_a_closed_port_is_unavailable_quickly_without_the_password() -> None:
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"database 127\.0\.0\.1:1/ferry: cannot connect") as info:
        PostgresStore.open("postgresql://ferry:s3cret@127.0.0.1:1/ferry", node="a")
    assert "s3cret" not in str(info.value)
    assert time.monotonic() - began < 10


@pytest.fixture
async def proxied(postgres_url: str, pg_proxy: TcpProxy) -> AsyncIterator[tuple[PostgresStore, TcpProxy]]:
    store = PostgresStore.open(pg_proxy.url(postgres_url), node="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store, pg_proxy
        nursery.cancel_scope.cancel()
    store.close()


async def test_an_unreachable_server_fails_fast_then_the_store_recovers(
    proxied: tuple[PostgresStore, TcpProxy],
) -> None:
    store, proxy = proxied
    assert (await store.insert_events([incoming(1)], dedup_window=60))[0][1] is False
    proxy.cut()
    with pytest.raises(StoreUnavailable):
        await store.insert_events([incoming(2)], dedup_window=60)
    # While it stays away: each try fails, and quickly (backoff, not a connect timeout per request).
    began = trio.current_time()
    for n in range(3, 6):
        with pytest.raises(StoreUnavailable):
            await store.insert_events([incoming(n)], dedup_window=60)
    assert trio.current_time() - began < 10
    assert not store.writable
    proxy.restore()

    async def stored() -> bool:
        try:
            await store.insert_events([incoming(9)], dedup_window=60)
        except StoreUnavailable:
            return False
        return True

    await eventually(stored)
    await eventually(lambda: store.writable)  # readiness holds off a second after the last failure
    # Nothing refused was stored; the waiting operations wait an outage out.
    assert [e.payload for e in await store.read_events(["hooks"], 0, 100)] == [b'{"n":1}', b'{"n":9}']


async def test_a_terminated_connection_is_replaced(postgres_url: str) -> None:
    store = PostgresStore.open(postgres_url, node="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.insert_events([incoming(1)], dedup_window=60)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            (killed,) = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'ferry %%'"
            ).fetchone() or (0,)
        assert killed == 1
        # Waiting operations ride the outage out: this one commits on the new connection.
        assert await store.cursor("shape") == 0
        await store.insert_events([incoming(2)], dedup_window=60)
        assert len(await store.read_events(["hooks"], 0, 10)) == 2
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_node_that_finds_another_schema_after_a_reconnect_refuses_to_write(
    postgres_url: str,
) -> None:
    store = PostgresStore.open(postgres_url, node="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("INSERT INTO ferry_schema VALUES (%s, 0)", (VERSION + 1,))
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'ferry %%'"
            )
        refusals: list[str] = []
        for _ in range(3):  # the first meets the dead connection, the next the new schema
            with pytest.raises(StoreUnavailable) as info:
                await store.insert_events([incoming(1)], dedup_window=60)
            refusals.append(str(info.value))
        assert any("does not match this ferry's" in refusal for refusal in refusals), refusals
        nursery.cancel_scope.cancel()
    store.close()
