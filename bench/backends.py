"""The store's two backends side by side: one node on PostgreSQL against one node on SQLite.

`python -m bench.backends [--events N] [--rounds R] [--url URL]`: each round measures, on each
backend in turn (same run, same machine, alternating so load drifts hit both):

- durable ingest: `concurrency` webhook-like callers, each storing one event (an idempotency
  key each, one sink) and waiting for its commit, through the webhook's `IngestBatcher` (as the
  daemon stores them: concurrent requests share a write), group-committed by the engine:
  events/s (`synchronous_commit` on; SQLite `durability = "full"`);
- per-event delivery: a sink's loop through the store alone (no HTTP): fetch due rows, record
  each row's outcome in its own call from 8 workers, as `actors/sink` does without batching:
  deliveries/s;
- round trips per event on PostgreSQL: statements + commits sent, per event ingested and per
  delivery recorded (counted on the store's connection).

With `--daemon SECONDS`, also the whole daemon (webhook source only) under wrk on each backend:
accepted events/s over the load. Prints a table with medians over the rounds and the PG/SQLite
ratios. The PostgreSQL database is
created and dropped by the bench (default server: `FERRY_TEST_POSTGRES` or 127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from actors.webhook.ingest import IngestBatcher
from bench.context import Context
from bench.harness import Ferry, post_load, write_config, wrk_missing, wrk_script
from bench.report import Row
from daemon.store.api import Outbox
from daemon.store.postgres import connect as pg_connect
from daemon.store.postgres.store import PostgresStore
from daemon.store.sqlite import Store
from daemon.store.types import Outcomes

ADMIN = os.environ.get("FERRY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
FAR = 2e10


class Counting:
    """Counts what the PostgreSQL store sends: statements and commits (each one round trip)."""

    def __init__(self) -> None:
        self.count = 0
        execute, commit = pg_connect.Db.execute, pg_connect.PostgresTransactions.commit
        counter = self

        def counted_execute(db: pg_connect.Db, sql: str, params: Any = None) -> Any:
            counter.count += 1
            return execute(db, sql, params)

        def counted_commit(tx: pg_connect.PostgresTransactions, conn: pg_connect.Db) -> None:
            counter.count += 1
            commit(tx, conn)

        pg_connect.Db.execute = counted_execute  # type: ignore[method-assign,assignment]
        pg_connect.PostgresTransactions.commit = counted_commit  # type: ignore[method-assign,assignment]


async def ingest(store: Outbox, events: int, concurrency: int) -> float:
    """Events/s of `events` webhook-like requests from `concurrency` callers, each waiting for
    its commit, through the webhook's own `IngestBatcher` (as the daemon stores them)."""
    todo = iter(range(events))
    batcher = IngestBatcher(store, sinks={"hooks": ("crm",)}, consumers={}, dedup_window=3600)

    async def caller() -> None:
        for n in todo:
            body = b'{"id":%d,"first":"Ada","last":"Lovelace","email":"ada@example.com"}' % n
            await batcher("hooks", body, f"k{n}", None)

    async with trio.open_nursery() as outer:
        await outer.start(batcher.run)
        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(caller)
        elapsed = time.perf_counter() - began
        outer.cancel_scope.cancel()
    return events / elapsed


async def deliver(store: Outbox, events: int, workers: int = 8, window: int = 64) -> float:
    """Deliveries/s of a sink's loop through the store alone (no HTTP), shaped as `actors/sink`:
    fetch due rows (at most `window` held), `workers` each take a row, hand its outcome to one
    committer that records everything handed in while its previous commit was in the store in one
    call (`actors/sink/commit.py`), and wait for that commit before taking the next row."""
    done = 0
    freed = trio.Event()
    handed: list[tuple[int, trio.Event]] = []
    handed_in = trio.Event()
    began = time.perf_counter()
    send, receive = trio.open_memory_channel[int](window)

    async def worker() -> None:
        nonlocal done, freed
        async for rowid in receive:
            committed = trio.Event()
            handed.append((rowid, committed))
            handed_in.set()
            await committed.wait()
            done += 1
            freed.set()

    async def committer() -> None:
        nonlocal handed_in
        while True:
            await handed_in.wait()
            handed_in = trio.Event()
            group, handed[:] = list(handed), []
            await store.record_outcomes(
                [(Outcomes([(rowid, 200)], [], []), 0.001, "ok") for rowid, _ in group]
            )
            for _, committed in group:
                committed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer)
        async with trio.open_nursery() as sinks:
            for _ in range(workers):
                sinks.start_soon(worker)
            async with send:
                sent: set[int] = set()
                while len(sent) < events:
                    if len(sent) - done >= window:
                        freed = trio.Event()
                        await freed.wait()
                        continue
                    rows = await store.due_deliveries("crm", FAR, window)
                    fresh = [row.rowid for row in rows if row.rowid not in sent]
                    sent.update(fresh)
                    for rowid in fresh:
                        send.send_nowait(rowid)
                    if not fresh:
                        freed = trio.Event()
                        await freed.wait()
        nursery.cancel_scope.cancel()
    return events / (time.perf_counter() - began)


async def run_sqlite(folder: Path, events: int, concurrency: int) -> tuple[float, float]:
    store = Store.open(folder / f"{secrets.token_hex(4)}.db", durability="full")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        rate = await ingest(store, events, concurrency)
        delivery = await deliver(store, events)
        nursery.cancel_scope.cancel()
    store.close()
    return rate, delivery


COUNTER = Counting()


async def run_postgres(events: int, concurrency: int, counter: Counting) -> tuple[float, float, float, float]:
    name = f"ferry_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        store = PostgresStore.open(ADMIN.rpartition("/")[0] + "/" + name, node="bench")
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            before = counter.count
            rate = await ingest(store, events, concurrency)
            ingest_trips = (counter.count - before) / events
            before = counter.count
            delivery = await deliver(store, events)
            delivery_trips = (counter.count - before) / events
            nursery.cancel_scope.cancel()
        store.close()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return rate, delivery, ingest_trips, delivery_trips


async def daemon_ingest(folder: Path, duration: float, rounds: int) -> dict[str, list[float]]:
    """The whole daemon (webhook source only, stored durably) under wrk on each backend, alternating:
    accepted events/s, counted in the store (every one was answered 202 after its commit)."""
    from bench.harness import Ferry

    results: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    await trio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
    script = wrk_script(folder)
    for round_ in range(rounds):
        for backend in ("sqlite", "postgres"):
            where = folder / f"{backend}-{round_}"
            config = write_config(where, None)
            name = f"ferry_bench_{secrets.token_hex(4)}"
            url = ADMIN.rpartition("/")[0] + "/" + name
            if backend == "postgres":
                with psycopg.connect(ADMIN, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}"')
                text = config.read_text().replace(
                    "[store]\n", f'[store]\nbackend = "postgres"\nurl = "{url}"\n', 1
                )
                config.write_text(text.replace(f'path = "{where}/ferry.db"\n', ""))
            running: list[Ferry] = []
            try:
                ferry = await trio.to_thread.run_sync(Ferry.start, where, config, running)
                wrk = await post_load(ferry.url, script, duration=duration)
                if backend == "postgres":
                    with psycopg.connect(url) as conn:
                        row = conn.execute("SELECT count(*) FROM events").fetchone()
                    accepted = int(row[0]) if row else 0
                else:
                    accepted = ferry.accepted()
                results[backend].append(accepted / duration)
                print(
                    f"daemon round {round_ + 1} {backend}: {accepted / duration:,.0f} events/s "
                    f"(wrk {wrk.rps:,.0f} req/s, non-2xx {wrk.non_2xx})",
                    flush=True,
                )
            finally:
                for ferry in running:
                    ferry.stop()
                if backend == "postgres":
                    with psycopg.connect(ADMIN, autocommit=True) as admin:
                        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


async def measure(folder: Path, events: int, rounds: int, concurrency: int) -> dict[str, list[float]]:
    """`rounds` alternating rounds of the store-level figures (see the module docstring)."""
    results: dict[str, list[float]] = {
        k: [] for k in ("sq_in", "sq_out", "pg_in", "pg_out", "rt_in", "rt_out")
    }
    for round_ in range(rounds):
        sq_in, sq_out = await run_sqlite(folder, events, concurrency)
        pg_in, pg_out, rt_in, rt_out = await run_postgres(events, concurrency, COUNTER)
        for key, value in zip(results, (sq_in, sq_out, pg_in, pg_out, rt_in, rt_out), strict=True):
            results[key].append(value)
        print(
            f"   round {round_ + 1}: ingest sqlite {sq_in:,.0f}/s postgres {pg_in:,.0f}/s; "
            f"delivery sqlite {sq_out:,.0f}/s postgres {pg_out:,.0f}/s; "
            f"pg statements/event ingest {rt_in:.2f} delivery {rt_out:.2f}",
            flush=True,
        )
    return results


async def store_backends(ctx: Context) -> None:
    """Case 11 of `python -m bench`: one node on PostgreSQL against one on SQLite (the store, and
    the whole daemon's ingest under wrk); skipped with a note when no PostgreSQL server answers."""
    try:
        with psycopg.connect(ADMIN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        ctx.anomalies.append(f"11. PostgreSQL vs SQLite: skipped, no server at {ADMIN} ({exc})")
        return
    rounds = 1 if ctx.quick else 3
    found = await measure(ctx.tmp, 1000 if ctx.quick else 5000, rounds, 50)
    daemon = await daemon_ingest(ctx.tmp / "backends", ctx.duration, rounds)
    med: Callable[[str], float] = lambda key: statistics.median(found[key])  # noqa: E731
    lite, post = statistics.median(daemon["sqlite"]), statistics.median(daemon["postgres"])
    for figure, pg, sq, goal in (
        ("11. durable ingest, store, PostgreSQL vs SQLite", med("pg_in"), med("sq_in"), 0.5),
        ("11. durable ingest, daemon (wrk), PostgreSQL vs SQLite", post, lite, 0.5),
        ("11. per-event delivery, store, PostgreSQL vs SQLite", med("pg_out"), med("sq_out"), None),
    ):
        ratio = pg / sq
        target = f">= {goal}x SQLite" if goal else ""
        passed = None if goal is None else ratio >= goal
        ctx.rows.append(Row(figure, pg, "/s", baseline=sq, ratio=ratio, target=target, passed=passed))
    ctx.rows.append(Row("11. PostgreSQL statements per event ingested", med("rt_in"), "per event"))
    ctx.rows.append(Row("11. PostgreSQL statements per delivery recorded", med("rt_out"), "per delivery"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--daemon", type=float, default=0, metavar="SECONDS", help="also the whole daemon under wrk this long"
    )
    args = parser.parse_args(argv)
    if args.daemon and (missing := wrk_missing()) is not None:  # only the daemon's load needs wrk
        return missing
    with tempfile.TemporaryDirectory() as folder:
        results = trio.run(measure, Path(folder), args.events, args.rounds, args.concurrency)
    med: Callable[[str], float] = lambda key: statistics.median(results[key])  # noqa: E731
    print(f"\nmedians over {args.rounds} rounds of {args.events} events (load: {os.getloadavg()[0]:.1f})")
    for label, sq, pg in (("durable ingest", "sq_in", "pg_in"), ("per-event delivery", "sq_out", "pg_out")):
        ratio = med(pg) / med(sq)
        print(f"{label:<19} sqlite {med(sq):>8,.0f}/s  postgres {med(pg):>8,.0f}/s  ratio {ratio:.2f}")
    trips = f"ingest {med('rt_in'):.2f}, delivery {med('rt_out'):.2f}"
    print(f"postgres statements + commits per event (each at most a round trip): {trips}")
    if args.daemon:
        with tempfile.TemporaryDirectory() as folder:
            daemon = trio.run(daemon_ingest, Path(folder), args.daemon, args.rounds)
        lite, post = statistics.median(daemon["sqlite"]), statistics.median(daemon["postgres"])
        ratio = post / lite
        print(f"daemon ingest (wrk) sqlite {lite:>8,.0f}/s  postgres {post:>8,.0f}/s  ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
