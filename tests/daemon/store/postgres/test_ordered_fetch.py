"""The ordered fetch on PostgreSQL: its cost follows the keys, not the backlog; no deadlock with
ingest between nodes (issue 15)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from daemon.config.sync import OrderingConfig
from daemon.store.keying import Ordering
from daemon.store.postgres.deliveries import CANDIDATES
from daemon.store.postgres.store import PostgresStore
from daemon.store.types import Incoming, Outcomes
from tests.postgres import postgres_url, two_nodes

__all__ = ["postgres_url"]

FAR = 2e10
ORDERING = Ordering(OrderingConfig(key=".k", version=".v", compare="number"))


@pytest.fixture
async def nodes(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with two_nodes(postgres_url, lease=30.0) as pair:
        yield pair


async def ingest(store: PostgresStore, bodies: list[dict[str, Any]]) -> None:
    await store.insert_events(
        [Incoming("hooks", msgspec.json.encode(body), None, ("crm",)) for body in bodies], dedup_window=0
    )


def examined(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of `deliveries` read (returned plus filtered out, over all loops)."""
    own = 0
    if plan.get("Relation Name") == "deliveries":
        loops = int(plan.get("Actual Loops", 1))
        own = (int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))) * loops
    return own + sum(examined(child) for child in plan.get("Plans", []))


def indexes(plan: dict[str, Any]) -> set[str]:
    own = {plan["Index Name"]} if "Index Name" in plan else set()
    return own.union(*(indexes(child) for child in plan.get("Plans", [])))


async def test_the_ordered_fetch_reads_each_keys_head_not_the_backlog(
    postgres_url: str, nodes: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = nodes
    backlog, keys = 3000, 30
    for start in range(0, backlog, 500):
        await ingest(a, [{"k": f"k{i % keys}", "v": i} for i in range(start, start + 500)])
    assert (await a.due_ordered(ORDERING, "crm", FAR, backlog)).rows  # keys every row
    # node-b's fetch: every head is node-a's, so it has nothing to send — and must not read the
    # 3,000 rows behind those heads to find that out.
    assert (await b.due_ordered(ORDERING, "crm", FAR, 100)).rows == []
    params = {"stage": "crm", "now": FAR, "wall": time.time(), "node": "node-b", "limit": 100}
    with psycopg.connect(postgres_url) as conn:
        ((explained,),) = conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {CANDIDATES}",
            params,
        ).fetchall()
        assert conn.execute(CANDIDATES, params).fetchall() == []
    plan = explained[0]["Plan"]
    assert "deliveries_heads" in indexes(plan)
    # Two probes per key (the skip scan, then the head), a few rows each: far from the backlog.
    assert examined(plan) <= 4 * keys, examined(plan)


async def test_two_nodes_ingesting_and_fetching_ordered_at_once_never_deadlock(
    postgres_url: str, nodes: tuple[PostgresStore, PostgresStore]
) -> None:
    rounds = 60

    async def ingesting(store: PostgresStore, name: str) -> None:
        for i in range(rounds):
            await ingest(store, [{"k": f"{name}{i % 7}", "v": i}, {"k": f"k{i % 5}", "v": i}])

    async def fetching(store: PostgresStore) -> None:
        for _ in range(rounds):
            fetched = await store.due_ordered(ORDERING, "crm", FAR, 20)
            if fetched.rows:
                delivered = Outcomes([(due.rowid, 200) for due in fetched.rows], [], [])
                await store.record_outcomes([(delivered, None, None)], ordering=ORDERING)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for store, name in zip(nodes, "ab", strict=True):
                nursery.start_soon(ingesting, store, name)
                nursery.start_soon(fetching, store)
    for store in nodes:
        store.close()  # a backend flushes its statistics (the deadlock count) as it exits
    database = postgres_url.rpartition("/")[2]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with trio.fail_after(10):
            while conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone() != (0,):
                await trio.sleep(0.05)
        ((deadlocks,),) = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchall()
    assert deadlocks == 0
