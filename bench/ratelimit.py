"""Rate limiter overhead per permit (target <= 20 us), against an empty trio checkpoint.

    .venv/bin/python -m bench.ratelimit [--permits 20000] [--runs 5]

Three figures, each the median of `--runs` runs in this process:

- `TokenBucket.take`: the pure core, one call per permit;
- `acquire`, budget not limiting: one task taking permits of a budget that always has one:
  the cost every request pays while the budget is not the bottleneck. Baseline: `await
  trio.lowlevel.checkpoint()`, what any await costs. Target: <= 20 us.
- `acquire`, queued: 16 tasks of 4 users on a budget that is always empty, so every permit
  goes through the fair queue and the leader's hand-over to another task. It runs on trio's
  MockClock with autojump, so the waits take no wall time; the baseline is one `trio.sleep`
  on the same clock per permit (the wait the budget imposes anyway), and the difference is
  the limiter's own work: queueing, hand-over, task switches. For information: a request
  that queues for a permit is waiting for the rate, not for the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from bench.context import Context
from bench.report import Row
from daemon.config.limits import RateLimitConfig
from daemon.config.units import Duration
from daemon.limits.ratelimit import RateLimiter, TokenBucket

TARGET_US = 20.0
USERS, TASKS_PER_USER = 4, 4


def _take(permits: int) -> float:
    bucket = TokenBucket(1e12, 1.0, 10**9)
    began = time.perf_counter()
    for n in range(permits):
        bucket.take(n * 1e-9)
    return (time.perf_counter() - began) / permits


def _timed(body: Callable[[], Awaitable[None]], permits: int, *, mock: bool = False) -> float:
    elapsed = 0.0

    async def main() -> None:
        nonlocal elapsed
        began = time.perf_counter()
        await body()
        elapsed = time.perf_counter() - began

    clock = trio.testing.MockClock(autojump_threshold=0) if mock else None
    trio.run(main, clock=clock)
    return elapsed / permits


def _checkpoints(permits: int) -> float:
    async def body() -> None:
        for _ in range(permits):
            await trio.lowlevel.checkpoint()

    return _timed(body, permits)


def _mock_sleeps(permits: int) -> float:
    async def body() -> None:
        for _ in range(permits):
            await trio.sleep(0.001)

    return _timed(body, permits, mock=True)


def _free(permits: int) -> float:
    async def body() -> None:
        limiter = RateLimiter("bench", RateLimitConfig(rate=1e12, burst=10**9))
        for _ in range(permits):
            await limiter.acquire("sink")

    return _timed(body, permits)


def _queued(permits: int) -> float:
    async def body() -> None:
        limiter = RateLimiter("bench", RateLimitConfig(rate=1000, per=Duration(1), burst=1))
        each = permits // (USERS * TASKS_PER_USER)

        async def worker(user: str) -> None:
            for _ in range(each):
                await limiter.acquire(user)

        async with trio.open_nursery() as nursery:
            for user in range(USERS):
                for _ in range(TASKS_PER_USER):
                    nursery.start_soon(worker, f"user{user}")

    return _timed(body, permits, mock=True)


def measure(permits: int, runs: int) -> dict[str, float]:
    """Median seconds per permit of each case."""
    cases = {
        "checkpoint": _checkpoints,
        "mock_sleep": _mock_sleeps,
        "take": _take,
        "free": _free,
        "queued": _queued,
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, case in cases.items():
            samples[name].append(case(permits))
    return {name: statistics.median(values) for name, values in samples.items()}


def rows(result: dict[str, float]) -> list[Row]:
    us = {name: value * 1e6 for name, value in result.items()}
    return [
        Row("rate limiter: TokenBucket.take (pure core)", us["take"], "us/permit"),
        Row(
            "rate limiter: acquire, budget not limiting",
            us["free"],
            "us/permit",
            baseline=us["checkpoint"],
            ratio=us["free"] / us["checkpoint"],
            target=f"<= {TARGET_US:g} us",
            passed=us["free"] <= TARGET_US,
            baseline_unit="us/checkpoint",
        ),
        Row(
            "rate limiter: acquire, queued (16 tasks, 4 users), MockClock",
            us["queued"],
            "us/permit",
            baseline=us["mock_sleep"],
            ratio=us["queued"] / us["mock_sleep"],
            baseline_unit="us/sleep",
        ),
    ]


async def ratelimit_overhead(ctx: Context) -> None:
    """The `python -m bench` case: its rows join the run's table (in a thread: its own trio.run)."""
    result = await trio.to_thread.run_sync(measure, 5000 if ctx.quick else 50_000, 3 if ctx.quick else 5)
    ctx.rows.extend(rows(result))
    ctx.details["ratelimit_us_per_permit"] = {name: value * 1e6 for name, value in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.splitlines()[0])
    parser.add_argument("--permits", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    table = rows(measure(args.permits, args.runs))
    for row in table:
        extra = (
            f"  (baseline {row.baseline:.2f} {row.baseline_unit}, {row.ratio:.1f}x)" if row.baseline else ""
        )
        verdict = "" if row.passed is None else ("  ok" if row.passed else f"  MISSES {row.target}")
        print(f"{row.figure:<50} {row.value:8.2f} {row.unit}{extra}{verdict}")
    return 0 if all(row.passed is not False for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
