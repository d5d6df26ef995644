"""Leases, heartbeats, pauses and drains on a real PostgreSQL server (daemon/store/leases.py, fencing.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
import trio

from daemon.errors import LeaseLost, StoreUnavailable
from daemon.store import fencing
from daemon.store.coordination import NodeInfo
from daemon.store.fencing import Fence
from daemon.store.leases import PostgresCoordination
from tests.postgres import ferry_database, postgres_url

__all__ = ["ferry_database", "postgres_url"]

A = NodeInfo("node-a", "host-a", "127.0.0.1:8001", 101)
B = NodeInfo("node-b", "host-b", "127.0.0.1:8002", 102)


@pytest.fixture
async def coordination(ferry_database: str) -> AsyncIterator[PostgresCoordination]:
    coordination = PostgresCoordination(ferry_database, timeout=2.0)
    yield coordination
    await coordination.close()


async def _expired(coordination: PostgresCoordination, name: str) -> None:
    """Wait (on the database's clock) until lease `name` has expired."""
    with trio.fail_after(10):
        while any(row.name == name and row.remaining > 0 for row in await coordination.leases()):
            await trio.sleep(0.02)


def _commit_fenced(url: str, fence: Fence | None) -> None:
    """A singleton's commit as the store runs it: the fence check, then a write, one transaction."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("CREATE TABLE IF NOT EXISTS cursor_t (name text PRIMARY KEY, position int)")
        fencing.check(conn, fence)
        conn.execute("INSERT INTO cursor_t VALUES ('t', 1) ON CONFLICT (name) DO UPDATE SET position = 2")


async def test_a_free_lease_goes_to_one_node_and_is_renewed_with_the_same_token(
    coordination: PostgresCoordination,
) -> None:
    first = await coordination.beat(A, {}, ["transform.t"], ttl=5)
    assert first.granted == {"transform.t": 1}
    other = await coordination.beat(B, {}, ["transform.t"], ttl=5)
    assert other.granted == {}  # held by A and not expired
    again = await coordination.beat(A, {"transform.t": 1}, ["transform.t"], ttl=5)
    assert again.renewed == {"transform.t": 1}
    assert again.granted == {}
    (row,) = await coordination.leases()
    assert (row.holder, row.token) == ("node-a", 1)
    assert 4 < row.remaining <= 5


async def test_an_expired_lease_goes_to_another_node_with_a_higher_token(
    coordination: PostgresCoordination,
) -> None:
    await coordination.beat(A, {}, ["poll.p"], ttl=0.3)
    await _expired(coordination, "poll.p")
    taken = await coordination.beat(B, {}, ["poll.p"], ttl=5)
    assert taken.granted == {"poll.p": 2}
    late = await coordination.beat(A, {"poll.p": 1}, ["poll.p"], ttl=5)
    assert late.renewed == {}, "a renewal after expiry must not succeed"
    assert late.granted == {}, "B holds it now"


async def test_every_acquisition_increases_the_token_even_by_the_same_node(
    coordination: PostgresCoordination,
) -> None:
    tokens = []
    for _ in range(3):
        beat = await coordination.beat(A, {}, ["alerter"], ttl=5)  # not held locally: taken again
        tokens.append(beat.granted["alerter"])
    assert tokens == [1, 2, 3]


async def test_a_stale_token_cannot_commit(coordination: PostgresCoordination, postgres_url: str) -> None:
    await coordination.beat(A, {}, ["transform.t"], ttl=0.3)
    await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-a", 1))
    await _expired(coordination, "transform.t")
    with pytest.raises(LeaseLost):  # expired, even before anyone took it over
        await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-a", 1))
    await coordination.beat(B, {}, ["transform.t"], ttl=5)
    with pytest.raises(LeaseLost, match="token 1"):
        await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-a", 1))
    with pytest.raises(LeaseLost):  # the right token under the wrong holder
        await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-a", 2))
    await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-b", 2))
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT position FROM cursor_t").fetchall() == [(2,)]


async def test_a_refused_commit_writes_nothing(coordination: PostgresCoordination, postgres_url: str) -> None:
    assert await coordination.leases() == []  # the tables exist, no lease does
    await trio.to_thread.run_sync(_commit_fenced, postgres_url, None)  # no fence: nothing checked
    with pytest.raises(LeaseLost):  # never acquired at all
        await trio.to_thread.run_sync(_commit_fenced, postgres_url, Fence("transform.t", "node-a", 7))
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT position FROM cursor_t").fetchall() == [(1,)]


async def test_a_commit_in_flight_orders_itself_against_a_takeover(
    coordination: PostgresCoordination, postgres_url: str
) -> None:
    """A holds the lease row FOR KEY SHARE in an open commit: B's takeover skips the row (without
    waiting) until that commit has ended, then takes it; A's commit landed first."""
    await coordination.beat(A, {}, ["transform.t"], ttl=0.5)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE cursor_t (name text PRIMARY KEY, position int)")
        conn.commit()
        fencing.check(conn, Fence("transform.t", "node-a", 1))  # transaction open, row locked
        await _expired(coordination, "transform.t")
        with trio.fail_after(1.5):  # a heartbeat never waits on another node's commit
            skipped = await coordination.beat(B, {}, ["transform.t"], ttl=5)
        assert skipped.granted == {}, "the takeover must not pass a commit holding the lease row"
        conn.execute("INSERT INTO cursor_t VALUES ('t', 1)")
        conn.commit()
    assert (await coordination.beat(B, {}, ["transform.t"], ttl=5)).granted == {"transform.t": 2}


async def test_the_holders_commit_in_flight_does_not_hold_up_its_renewal(
    coordination: PostgresCoordination, postgres_url: str
) -> None:
    await coordination.beat(A, {}, ["transform.t"], ttl=5)
    with psycopg.connect(postgres_url) as conn:
        fencing.check(conn, Fence("transform.t", "node-a", 1))  # a long group commit, still open
        with trio.fail_after(1.5):
            renewed = await coordination.beat(A, {"transform.t": 1}, ["transform.t"], ttl=5)
        assert renewed.renewed == {"transform.t": 1}
        conn.rollback()


async def test_nodes_are_listed_with_their_leases_and_dead_after_the_timeout(
    coordination: PostgresCoordination,
) -> None:
    await coordination.beat(A, {}, ["transform.t", "alerter"], ttl=5)
    await coordination.beat(B, {}, [], ttl=5)
    nodes = {node.id: node for node in await coordination.nodes(dead_after=10)}
    assert nodes["node-a"].leases == ["alerter", "transform.t"]
    assert nodes["node-a"].alive
    assert nodes["node-b"].leases == []
    assert nodes["node-b"].address == "127.0.0.1:8002"
    with trio.fail_after(10):
        while any(node.alive for node in await coordination.nodes(dead_after=0.2)):
            await trio.sleep(0.05)


async def test_a_node_leaving_lets_its_leases_go_at_once(coordination: PostgresCoordination) -> None:
    await coordination.beat(A, {}, ["transform.t"], ttl=60)
    await coordination.leave("node-a")
    assert (await coordination.beat(B, {}, ["transform.t"], ttl=5)).granted == {"transform.t": 2}
    assert [node.id for node in await coordination.nodes(dead_after=10)] == ["node-b"]


async def test_release_needs_the_current_token(coordination: PostgresCoordination) -> None:
    await coordination.beat(A, {}, ["poll.p"], ttl=60)
    await coordination.release("node-a", "poll.p", 99)  # a stale release changes nothing
    assert (await coordination.beat(B, {}, ["poll.p"], ttl=5)).granted == {}
    await coordination.release("node-a", "poll.p", 1)
    assert (await coordination.beat(B, {}, ["poll.p"], ttl=5)).granted == {"poll.p": 2}


async def test_pauses_and_drains_are_seen_by_every_node(coordination: PostgresCoordination) -> None:
    assert await coordination.set_paused("crm", True, "node-a") is True
    assert await coordination.set_paused("crm", True, "node-b") is False  # already paused
    assert (await coordination.beat(B, {}, [], ttl=5)).paused == {"crm"}
    assert await coordination.set_paused("crm", False, "node-b") is True
    assert (await coordination.beat(A, {}, [], ttl=5)).paused == frozenset()
    drain = await coordination.start_drain("node-a", timeout=30)
    with pytest.raises(ValueError, match="already under way"):
        await coordination.start_drain("node-b", timeout=30)
    seen = (await coordination.beat(B, {}, [], ttl=5)).drain
    assert seen is not None
    assert (seen.number, seen.active, seen.done) == (drain.number, True, False)
    await coordination.finish_drain(drain.number)
    seen = (await coordination.beat(B, {}, [], ttl=5)).drain
    assert seen is not None
    assert (seen.active, seen.done) == (False, True)
    assert (await coordination.start_drain("node-b", timeout=30)).number == drain.number + 1


async def test_an_unreachable_database_is_unavailable_within_the_timeout() -> None:
    coordination = PostgresCoordination("postgresql://127.0.0.1:1/nothing", timeout=0.5)
    with trio.fail_after(5), pytest.raises(StoreUnavailable, match="database"):
        await coordination.beat(A, {}, ["x"], ttl=5)


async def test_each_node_publishes_its_metrics_and_only_recent_ones_are_read(
    coordination: PostgresCoordination, ferry_database: str
) -> None:
    await coordination.publish_metrics("a:1", b'{"x":[]}')
    await coordination.publish_metrics("b:1", b"first")
    await coordination.publish_metrics("b:1", b"second")  # replaces its own row
    assert await coordination.cluster_metrics(60) == {"a:1": b'{"x":[]}', "b:1": b"second"}
    with psycopg.connect(ferry_database, autocommit=True) as conn:  # a:1 last published 2 min ago
        conn.execute(
            "UPDATE ferry_node_metrics SET published_at = now() - interval '2 minutes' WHERE node = 'a:1'"
        )
    assert await coordination.cluster_metrics(60) == {"b:1": b"second"}
    assert set(await coordination.cluster_metrics(600)) == {"a:1", "b:1"}
