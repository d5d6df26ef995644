"""Cluster-wide rate budgets: two mechanisms measured side by side (issue 15).

    .venv/bin/python -m bench.budget [--url postgresql://127.0.0.1:5432/postgres] [--seconds 2]

A. **Shared row** (what ferry does, daemon/limits/shared.py): three nodes' limiters, each with its
   own connection, take permits from one PostgreSQL row in batches. Measured for real on the
   server at `--url` (a scratch database is created and dropped): round trips per permit, the
   median round trip, and the most permits granted in any window of T against the bucket's bound
   `burst + rate * T`, counted at the moment each `acquire` returns.
B. **Shares by live node count** (the alternative): each node runs its own bucket at `rate / N`,
   `burst / N`, N being the live nodes it saw at its last heartbeat. Simulated on trio's MockClock
   with the real `TokenBucket` (its permit path has no database round trip; the heartbeat
   costs one per node per interval whatever the traffic): the same windows while a fourth node
   joins and the others learn of it one heartbeat later, and the budget's use when only one node
   has work.

Both run three nodes at 200 permits/s, burst 20. Each scenario: saturated (every node has 16
callers), sequential (one caller per node), skewed (16 callers on one node only).
"""

from __future__ import annotations

import argparse
import math
import secrets
import statistics
import sys
import time
from typing import Any

import psycopg
import trio
import trio.testing

from bench.context import Context
from bench.report import Row
from daemon.config.limits import RateLimitConfig
from daemon.config.units import Duration
from daemon.limits.ratelimit import RateLimits, TokenBucket
from daemon.store.pg_budgets import PgBudgets
from daemon.store.postgres.connect import open_database

RATE, BURST, NODES = 200.0, 20, 3
WINDOWS = (0.1, 0.5, 1.0)
HEARTBEAT_S = 2.0  # how stale a node's view of the live count may be (one heartbeat interval)
ADMIN_URL = "postgresql://127.0.0.1:5432/postgres"


def most_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] > window:
            start += 1
        most = max(most, end - start + 1)
    return most


def overshoot(times: list[float]) -> float:
    """The most permits any window of WINDOWS held beyond the bucket's bound (<= 0: never over)."""
    return max(most_in_window(times, window) - (BURST + RATE * window) for window in WINDOWS)


# -- A: the shared row, for real -----------------------------------------------------------------


async def _shared(url: str, seconds: float, callers: list[int]) -> dict[str, Any]:
    config = RateLimitConfig(rate=RATE, per=Duration(1), burst=BURST)
    nodes = [RateLimits({"api": config}, budgets=PgBudgets(url)) for _ in callers]
    grants: list[float] = []

    async def caller(limits: RateLimits) -> None:
        while True:
            await limits["api"].acquire("sink")
            grants.append(time.monotonic())

    for limits in nodes:  # connect (and create the table) before the clock starts
        await limits["api"].acquire("warm-up")
    began = time.monotonic()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for limits, count in zip(nodes, callers, strict=True):
                for _ in range(count):
                    nursery.start_soon(caller, limits)
    elapsed = time.monotonic() - began
    round_trips = sum(limits["api"].status().round_trips for limits in nodes) - len(nodes)
    rtt: list[float] = []
    probe = PgBudgets(url)
    for _ in range(50):
        t0 = time.perf_counter()
        await probe.take("probe", 1, 1e9, 10**6)
        rtt.append(time.perf_counter() - t0)
    for limits in nodes:
        assert limits.budgets is not None
        await limits.budgets.aclose()
    await probe.aclose()
    return {
        "permits": len(grants),
        "use": len(grants) / (BURST + RATE * elapsed),
        "round_trips_per_permit": round_trips / max(1, len(grants)),
        "overshoot": overshoot(grants),
        "rtt_ms": statistics.median(rtt) * 1000,
    }


# -- B: shares by live node count, simulated --------------------------------------------------------


def _shares(seconds: float, callers: list[int], *, join_at: float | None) -> dict[str, Any]:
    """Nodes with local buckets of rate/N; with `join_at`, a fourth saturated node starts then and
    the first three keep N = 3 for one heartbeat more."""
    grants: list[float] = []
    result: dict[str, Any] = {}

    async def node(count: int, live: list[int], start: float) -> None:
        await trio.sleep(start)
        seen = live[0]
        bucket = TokenBucket(RATE / seen, 1.0, max(1, BURST // seen))

        async def one() -> None:
            while True:
                wait = bucket.take(trio.current_time())
                if wait:
                    await trio.sleep(wait)
                    continue
                grants.append(trio.current_time())

        async def heartbeat() -> None:
            nonlocal seen
            while True:
                await trio.sleep(HEARTBEAT_S)
                if live[0] != seen:
                    seen = live[0]
                    bucket.reconfigure(RATE / seen, 1.0, max(1, BURST // seen))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            for _ in range(count):
                nursery.start_soon(one)

    async def main() -> None:
        live = [len(callers)]
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for count in callers:
                    nursery.start_soon(node, count, live, 0.0)
                if join_at is not None:
                    await trio.sleep(join_at)
                    live[0] += 1
                    nursery.start_soon(node, 16, live, 0.0)
        result["permits"] = len(grants)
        result["use"] = len(grants) / (BURST + RATE * seconds)
        result["overshoot"] = overshoot(grants)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    result["round_trips_per_permit"] = (len(callers) * seconds / HEARTBEAT_S) / max(1, result["permits"])
    return result


def measure(url: str, seconds: float) -> dict[str, dict[str, Any]]:
    name = f"ferry_bench_{secrets.token_hex(4)}"
    base = url.rpartition("/")[0]
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        scratch = f"{base}/{name}"
        open_database(scratch, node="bench", cipher=None).close()  # the schema, as a node's store makes it
        out = {
            "shared, saturated": trio.run(_shared, scratch, seconds, [16] * NODES),
            "shared, sequential": trio.run(_shared, scratch, seconds, [1] * NODES),
            "shared, skewed": trio.run(_shared, scratch, seconds, [16, 0, 0]),
        }
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    sim = max(seconds, 3 * HEARTBEAT_S)
    out["shares, saturated"] = _shares(sim, [16] * NODES, join_at=None)
    out["shares, a node joins"] = _shares(sim, [16] * NODES, join_at=HEARTBEAT_S * 1.01)
    out["shares, skewed"] = _shares(sim, [16, 0, 0], join_at=None)
    return out


def rows(result: dict[str, dict[str, Any]]) -> list[Row]:
    table = []
    for case, figures in result.items():
        table.append(Row(f"budget {case}: use of the budget", figures["use"] * 100, "%"))
        table.append(
            Row(
                f"budget {case}: most over burst + rate*T",
                figures["overshoot"],
                "permits",
                target="<= 1" if case.startswith("shared") else "",
                passed=figures["overshoot"] <= 1 if case.startswith("shared") else None,
            )
        )
        table.append(Row(f"budget {case}: round trips per permit", figures["round_trips_per_permit"], "RT"))
    shared = result["shared, saturated"]
    table.append(Row("budget shared row: one round trip (median)", shared["rtt_ms"], "ms"))
    return table


async def budget_mechanisms(ctx: Context) -> None:
    """The `python -m bench` case (in a thread: its own trio.run); skipped without a server."""
    try:
        result = await trio.to_thread.run_sync(measure, ADMIN_URL, 1.0 if ctx.quick else 2.0)
    except psycopg.OperationalError as exc:
        ctx.rows.append(Row(f"budget: not measured, no PostgreSQL at {ADMIN_URL} ({exc})", None, ""))
        return
    ctx.rows.extend(rows(result))
    ctx.details["budget"] = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=ADMIN_URL)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    result = measure(args.url, args.seconds)
    for row in rows(result):
        value = "-" if row.value is None or math.isnan(row.value) else f"{row.value:8.3f}"
        print(f"{row.figure:<60} {value} {row.unit}")
    return 0 if all(row.passed is not False for row in rows(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
