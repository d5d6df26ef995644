"""An ordered sink's fetch on PostgreSQL with a backlog (issue 15; docs/performance.md).

    .venv/bin/python -m bench.ordered_pg [EVENTS [KEYS [ROUNDS [HELD]]]]

One node ingests EVENTS events over KEYS record keys into a scratch database (dropped
afterwards) on `FERRY_BENCH_POSTGRES`, keys them all with one fetch, lets HELD keys' heads be
held by another node, then runs ROUNDS of `due_ordered(limit=100)` + `record_outcomes` and
prints the median fetch time and the delivered events per second. Not part of `make bench`:
run it against two checkouts (PYTHONPATH) to compare.
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import time

import msgspec
import psycopg
import trio

from daemon.config.sync import OrderingConfig
from daemon.store.keying import Ordering
from daemon.store.postgres.store import PostgresStore
from daemon.store.types import Incoming, Outcomes

ADMIN = os.environ.get("FERRY_BENCH_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
LIMIT = 100


async def run(url: str, events: int, keys: int, rounds: int, held: int) -> str:
    store = PostgresStore.open(url, node="bench", lease=30.0)
    ordering = Ordering(OrderingConfig(key=".k", version=".v", compare="number"))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for start in range(0, events, 500):
            bodies = [{"k": f"k{i % keys}", "v": i} for i in range(start, min(events, start + 500))]
            incoming = [Incoming("hooks", msgspec.json.encode(b), None, ("crm",)) for b in bodies]
            await store.insert_events(incoming, dedup_window=0)
        await store.due_ordered(ordering, "crm", 2e10, events)  # keys every row: a keyed backlog
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE deliveries SET order_claimed = NULL, lease_owner = NULL, lease_until = NULL")
            conn.execute(
                "UPDATE deliveries SET order_claimed = 1, lease_owner = 'other', lease_until = 2e10 "
                "WHERE rowid IN (SELECT min(rowid) FROM deliveries GROUP BY order_key ORDER BY 1 LIMIT %s)",
                (held,),
            )
        times: list[float] = []
        delivered = 0
        began = time.perf_counter()
        for _ in range(rounds):
            start_fetch = time.perf_counter()
            fetched = await store.due_ordered(ordering, "crm", 2e10, LIMIT)
            times.append(time.perf_counter() - start_fetch)
            if fetched.rows:
                outcomes = Outcomes([(due.rowid, 200) for due in fetched.rows], [], [])
                await store.record_outcomes([(outcomes, None, None)], ordering=ordering)
                delivered += len(fetched.rows)
        elapsed = time.perf_counter() - began
        nursery.cancel_scope.cancel()
    store.close()
    return (
        f"{events} pending over {keys} keys, {held} heads held elsewhere, {rounds} rounds: fetch median "
        f"{statistics.median(times) * 1000:.1f} ms (max {max(times) * 1000:.1f}), "
        f"{delivered / elapsed:.0f} delivered events/s"
    )


def main(argv: list[str]) -> None:
    events, keys, rounds, held = ([int(a) for a in argv] + [10_000, 50, 10, 0][len(argv) :])[:4]
    database = "ferry_bench_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    try:
        print(trio.run(run, f"{ADMIN.rpartition('/')[0]}/{database}", events, keys, rounds, held))
    finally:
        with psycopg.connect(ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE {database} WITH (FORCE)")


if __name__ == "__main__":
    main(sys.argv[1:])
