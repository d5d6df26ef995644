"""Cluster-wide budgets: three nodes' limiters on one PostgreSQL database, counted at a real receiver.

Each "node" is a `RateLimits` with a `PgBudgets` connection of its own, as three daemons would
have; their callers send real HTTP requests to a `FakeReceiver`, which records when each came.
"""

from __future__ import annotations

import math
import time

import httpx
import psycopg
import pytest
import trio

from bench.budget import most_in_window as most_in_any_window
from daemon.config.limits import RateLimitConfig
from daemon.config.units import Duration
from daemon.limits.ratelimit import RateLimits
from daemon.limits.shared import MAX_BATCH, SharedBucket
from daemon.store.pg_budgets import PgBudgets
from tests.fakes import FakeReceiver
from tests.postgres import ferry_database, postgres_url

__all__ = ["ferry_database", "postgres_url"]

RATE, BURST = 10.0, 3
BUDGET = RateLimitConfig(rate=RATE, per=Duration(1), burst=BURST)


def blocked_in_database(url: str, name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT blocked_until > now() FROM ferry_rate_budgets WHERE name = %s", (name,)
        ).fetchone()
    return bool(row and row[0])


async def run_nodes(url: str, receiver: FakeReceiver, *, seconds: float, callers: int) -> list[RateLimits]:
    """Three nodes, `callers` concurrent senders each, sending for `seconds` through budget `api`."""
    nodes = [RateLimits({"api": BUDGET}, budgets=PgBudgets(url)) for _ in range(3)]

    async def send(limits: RateLimits, user: str, client: httpx.AsyncClient) -> None:
        limiter = limits["api"]
        while True:
            await limiter.acquire(user)
            await client.post(receiver.url, content=b"{}")

    async with httpx.AsyncClient(timeout=10) as client:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for i, limits in enumerate(nodes):
                    for caller in range(callers):
                        nursery.start_soon(
                            send, limits, "sink" if caller else "poller", client, name=f"node{i}"
                        )
    for limits in nodes:
        assert limits.budgets is not None
        await limits.budgets.aclose()
    return nodes


async def test_three_nodes_never_exceed_the_budget_together(ferry_database: str) -> None:
    """10 per second, burst 3, 3 nodes x 6 callers: every window counts at most burst + rate * T.

    One permit of slack is allowed for the time between a grant and its request's arrival (100 ms
    at this rate); three separate budgets would count three times as many. Windows are 1 s and
    longer: the three nodes share this one test process, so a stall of it (a loaded CI machine)
    lets requests granted apart arrive together, which a sub-second window would count as a
    burst the budget never granted.
    """
    receiver = FakeReceiver().start()
    try:
        nodes = await run_nodes(ferry_database, receiver, seconds=3.0, callers=6)
    finally:
        receiver.stop()
    times = [request.at for request in receiver.snapshot()]
    for window in (1.0, 2.0, max(times) - min(times)):
        bound = BURST + RATE * window + 1
        assert most_in_any_window(times, window) <= math.floor(bound), f"window {window}s"
    assert len(times) >= RATE * 3 * 0.5  # the budget is used, not starved
    shares = [sum(limits["api"].granted.values()) for limits in nodes]
    assert all(share > 0 for share in shares), shares  # every node gets permits
    round_trips = sum(limits["api"].status().round_trips for limits in nodes)
    assert round_trips >= len(times) / MAX_BATCH


async def test_a_retry_after_seen_by_one_node_holds_back_the_others(ferry_database: str) -> None:
    fast = RateLimitConfig(rate=1000, per=Duration(1), burst=10)
    one, other = (RateLimits({"api": fast}, budgets=PgBudgets(ferry_database)) for _ in range(2))
    try:
        await other["api"].acquire("sink")  # the row exists; permits flow
        one["api"].feedback(429, {"retry-after": "1"})
        told = time.monotonic()
        assert one["api"].status().paused_for_s > 0.9  # its own pause is immediate
        with trio.fail_after(5):  # written for the others by a task of its own
            while not await trio.to_thread.run_sync(blocked_in_database, ferry_database, "api"):
                await trio.sleep(0.01)
        with trio.fail_after(10):
            await other["api"].acquire("sink")
        waited = time.monotonic() - told
        assert waited >= 0.9, waited  # the other node learnt the pause from the database
        status = other["api"].status()
        assert status.shared
        assert status.round_trips >= 2
    finally:
        for limits in (one, other):
            assert limits.budgets is not None
            await limits.budgets.aclose()


async def test_a_renamed_budget_is_a_new_row_and_the_old_pause_stays_with_the_old_name(
    ferry_database: str,
) -> None:
    """A reload that renames `api` to `api2` on one node: its users start from a full bucket of the
    new name; a node still on the old config keeps honouring the old name's pause."""
    renamed, old = (RateLimits({"api": BUDGET}, budgets=PgBudgets(ferry_database)) for _ in range(2))
    try:
        old["api"].feedback(429, {"retry-after": "30"})
        with trio.fail_after(10):
            while not renamed["api"].status().paused_for_s:  # wait for the pause to reach the row
                with trio.move_on_after(0.05):
                    await renamed["api"].acquire("sink")
        renamed.update({"api2": BUDGET})
        assert list(renamed) == ["api2"]
        with trio.fail_after(2):
            for _ in range(BURST):
                await renamed["api2"].acquire("sink")
        with trio.move_on_after(0.3) as waited:
            await old["api"].acquire("sink")
        assert waited.cancelled_caught  # still paused under the old name
    finally:
        for limits in (renamed, old):
            assert limits.budgets is not None
            await limits.budgets.aclose()


async def test_a_database_that_does_not_answer_grants_nothing_then_recovers(ferry_database: str) -> None:
    """Fails closed: while the budget row is locked (a stuck database) no caller gets a permit;
    once it is released they do, without a restart."""
    limits = RateLimits({"api": BUDGET}, budgets=PgBudgets(ferry_database, timeout=0.2))
    limiter = limits["api"]
    granted = 0

    async def caller() -> None:
        nonlocal granted
        while True:
            await limiter.acquire("sink")
            granted += 1

    try:
        await limiter.acquire("sink")  # creates the table and the row
        with psycopg.connect(ferry_database) as locker:
            locker.execute("LOCK TABLE ferry_rate_budgets IN ACCESS EXCLUSIVE MODE")
            limiter_bucket = limiter._bucket
            assert isinstance(limiter_bucket, SharedBucket)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                with trio.fail_after(10):
                    while limiter_bucket.failures < 2 or limiter_bucket._held:
                        await trio.sleep(0.02)
                held_back = granted
                assert held_back <= BURST  # at most what was held before the lock
                locker.rollback()
                with trio.fail_after(10):
                    while granted < held_back + 3:
                        await trio.sleep(0.02)
                assert limiter_bucket.failures == 0
                nursery.cancel_scope.cancel()
    finally:
        assert limits.budgets is not None
        await limits.budgets.aclose()


async def test_without_a_database_each_budget_is_the_process_own() -> None:
    """SQLite (one node): no budgets backend, the in-memory bucket as before, no round trips."""
    limits = RateLimits({"api": BUDGET})
    status = limits["api"].status()
    assert (status.shared, status.round_trips) == (False, 0)
    assert limits.budgets is None


@pytest.mark.parametrize(("window", "expected"), [(0.0, 2), (1.0, 3), (10.0, 4)])
def test_the_window_counter_counts(window: float, expected: int) -> None:
    assert most_in_any_window([0.0, 0.5, 0.5, 5.0], window) == expected
