"""The rate limiter: the pure bucket on a fake clock, feedback parsing, the async limiter on MockClock."""

from __future__ import annotations

import email.utils
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from daemon.config.limits import RateLimitConfig
from daemon.config.root import parse
from daemon.config.units import Duration
from daemon.errors import ConfigError
from daemon.limits.ratelimit import MAX_PAUSE, RateLimiter, RateLimits, TokenBucket, pause_from

# -- the pure core -----------------------------------------------------------------------------

# (rate, per, burst, [(now, expected wait), ...]): each step calls take(now) once.
TAKE_TABLE = [
    pytest.param(1, 1, 1, [(0, 0), (0, 1), (0.5, 0.5), (1, 0), (1, 1)], id="one per second, no burst"),
    pytest.param(10, 1, 3, [(0, 0), (0, 0), (0, 0), (0, 0.1), (0.05, 0.05), (0.1, 0)], id="burst of three"),
    pytest.param(100, 10, 1, [(0, 0), (0.01, 0.09), (0.1, 0), (0.15, 0.05)], id="100 per 10s spaces 100ms"),
    pytest.param(1, 1, 2, [(0, 0), (0, 0), (100, 0), (100, 0), (100, 1)], id="idle refills only to burst"),
    pytest.param(2, 1, 1, [(5, 0), (4, 0.5), (5.5, 0)], id="clock going back refills nothing"),
]


@pytest.mark.parametrize(("rate", "per", "burst", "steps"), TAKE_TABLE)
def test_take_returns_the_wait_and_takes_only_when_zero(
    rate: float, per: float, burst: int, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, per, burst)
    for now, expected in steps:
        assert bucket.take(now) == pytest.approx(expected), f"take({now})"


def test_a_failed_take_takes_nothing() -> None:
    bucket = TokenBucket(1, 1, 1)
    assert bucket.take(0) == 0
    for _ in range(5):
        assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0


def test_a_pause_grants_nothing_before_it_ends_then_one_permit() -> None:
    bucket = TokenBucket(1, 1, 5)
    assert bucket.pause_until(10, now=0)
    assert bucket.take(3) == pytest.approx(7)
    assert bucket.take(10) == 0
    assert bucket.take(10) == pytest.approx(1)  # not a burst of five at the reset
    assert not bucket.pause_until(9, now=10), "a pause never shortens or repeats"
    assert not bucket.pause_until(5, now=10), "a pause in the past changes nothing"


def test_no_window_ever_holds_more_than_burst_plus_rate() -> None:
    """Drive the bucket greedily on a fake clock; count permits in every sliding window of `per`."""
    rate, per, burst = 7, 2.0, 3
    bucket, now, granted = TokenBucket(rate, per, burst), 0.0, []
    while now < 60:
        wait = bucket.take(now)
        if wait == 0:
            granted.append(now)
        now += wait if wait else 0.0
    for index, start in enumerate(granted):
        inside = [t for t in granted[index:] if t < start + per]
        assert len(inside) <= burst + rate
    assert len(granted) == pytest.approx(burst + rate * 60 / per, abs=1)


def test_reconfigure_keeps_permits_up_to_the_new_size() -> None:
    bucket = TokenBucket(1, 1, 10)
    bucket.reconfigure(1, 1, 2)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, pytest.approx(1)]


# -- feedback ----------------------------------------------------------------------------------

WALL = 1_700_000_000.0

FEEDBACK_TABLE = [
    pytest.param(429, {"retry-after": "7"}, 7, id="429 Retry-After seconds"),
    pytest.param(503, {"retry-after": email.utils.formatdate(WALL + 30, usegmt=True)}, 30, id="503 date"),
    pytest.param(500, {"retry-after": "7"}, None, id="Retry-After on a 500 is not a throttle"),
    pytest.param(429, {}, None, id="429 without a hint"),
    pytest.param(200, {"ratelimit-remaining": "0", "ratelimit-reset": "12"}, 12, id="RateLimit-* exhausted"),
    pytest.param(200, {"ratelimit-remaining": "3", "ratelimit-reset": "12"}, None, id="RateLimit-* left"),
    pytest.param(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "5"}, 5, id="X-RateLimit delay"),
    pytest.param(
        200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(WALL) + 42)}, 42, id="X- Unix time"
    ),
    pytest.param(200, {"ratelimit": '"default";r=0;t=9'}, 9, id="combined field, draft 8"),
    pytest.param(200, {"ratelimit": "limit=10, remaining=0, reset=4"}, 4, id="combined field, old draft"),
    pytest.param(
        429, {"retry-after": "2", "ratelimit-remaining": "0", "ratelimit-reset": "6"}, 6, id="longest"
    ),
    pytest.param(429, {"retry-after": "99999999"}, MAX_PAUSE, id="capped"),
    pytest.param(429, {"retry-after": "-3"}, None, id="negative is garbage"),
    pytest.param(200, {"x-ratelimit-remaining": "zero", "x-ratelimit-reset": "5"}, None, id="garbage count"),
    pytest.param(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "nan"}, None, id="garbage reset"),
]


@pytest.mark.parametrize(("status", "headers", "expected"), FEEDBACK_TABLE)
def test_pause_from_reads_every_kind_of_header(
    status: int, headers: dict[str, str], expected: float | None
) -> None:
    pause = pause_from(status, headers, wall=WALL)
    assert pause == (None if expected is None else pytest.approx(expected, abs=1))


# -- the async limiter on trio's MockClock -------------------------------------------------------


def budget(rate: float, per: float = 1.0, burst: int = 1) -> RateLimitConfig:
    return RateLimitConfig(rate=rate, per=Duration(per), burst=burst)


def run(fn: Callable[[], Awaitable[object]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_users_take_turns_whatever_their_number_of_waiters() -> None:
    """A user with 8 concurrent callers and one with 1: permits alternate between them."""
    order: list[str] = []

    async def main() -> None:
        limiter = RateLimiter("api", budget(10))

        async def worker(user: str) -> None:
            while len(order) < 40:
                await limiter.acquire(user)
                order.append(user)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker, "sink")
            nursery.start_soon(worker, "poller")
        assert limiter.granted["poller"] >= 19

    run(main)
    tail = order[2:40]  # the first permit goes to whoever came first, without a queue
    assert Counter(tail)["poller"] == pytest.approx(len(tail) / 2, abs=1)
    assert all(a != b for a, b in itertools.pairwise(tail)), order


def test_permits_are_spaced_at_the_rate_on_the_mock_clock() -> None:
    times: list[float] = []

    async def main() -> None:
        limiter = RateLimiter("api", budget(4, 2.0, burst=2))

        async def worker() -> None:
            for _ in range(5):
                await limiter.acquire("w")
                times.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)

    run(main)
    assert times[:2] == [0, 0]  # the burst
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert gaps == pytest.approx([0.5] * len(gaps))


def test_feedback_pauses_every_user_until_retry_after() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", budget(100, burst=10))
        await limiter.acquire("a")
        limiter.feedback(429, {"retry-after": "3"})
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            for user in ("a", "b", "c"):
                nursery.start_soon(limiter.acquire, user)
        assert trio.current_time() - began >= 3
        assert limiter.status().pauses == 1
        limiter.feedback(200, {"x-ratelimit-remaining": "5"})  # nothing to learn
        assert limiter.status().paused_for_s == 0

    run(main)


def test_a_reset_at_a_unix_time_pauses_until_then_on_the_injected_wall_clock() -> None:
    """GitHub's `X-RateLimit-Reset` is a Unix time: the pause is read against the limiter's wall
    clock, which a MockClock moves, so the budget resumes exactly at the reset."""

    async def main() -> None:
        limits = RateLimits({"api": budget(100, burst=10)}, wall=lambda: WALL + trio.current_time())
        limiter = limits["api"]
        await limiter.acquire("a")
        reset = WALL + trio.current_time() + 120
        limiter.feedback(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": f"{reset:.0f}"})
        assert limiter.status().paused_for_s == pytest.approx(120)
        began = trio.current_time()
        await limiter.acquire("b")
        assert trio.current_time() - began == pytest.approx(120)

    run(main)


def test_a_cancelled_waiter_leaves_the_queue_and_a_cancelled_leader_passes_the_lead() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", budget(1))
        await limiter.acquire("x")  # the bucket is empty now
        with trio.move_on_after(0.1):
            await limiter.acquire("leader")  # leads, then is cancelled mid-sleep
        got: list[str] = []

        async def take(user: str) -> None:
            await limiter.acquire(user)
            got.append(user)

        async def doomed(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await take("gone")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "b")
            await trio.testing.wait_all_tasks_blocked()
            scope = await nursery.start(doomed)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.status().waiting == 2
            scope.cancel()
            nursery.start_soon(take, "c")
        assert got == ["b", "c"]
        assert limiter.status().waiting == 0
        assert trio.current_time() == pytest.approx(2.0)

    run(main)


def test_a_reconfigured_budget_applies_to_waiters_already_queued() -> None:
    async def main() -> None:
        limits = RateLimits({"api": budget(1, per=60)})
        limiter = limits["api"]
        await limiter.acquire("a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limiter.acquire, "a")
            await trio.testing.wait_all_tasks_blocked()
            limits.update({"api": budget(10)})
        assert trio.current_time() < 1
        assert limits["api"] is limiter
        limits.update({})
        assert "api" not in limits

    run(main)


def test_status_shows_the_budget() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", budget(2, burst=2))
        await limiter.acquire("sink")
        status = limiter.status()
        assert (status.rate, status.per_s, status.burst, status.available) == (2, 1, 2, 1)
        assert status.granted == {"sink": 1}
        assert "api" in repr(limiter)

    run(main)


# -- config --------------------------------------------------------------------------------------

SINK = """
[sources.s]
type = "webhook"
[sinks.out]
type = "http"
inputs = ["s"]
url = "http://127.0.0.1:9/x"
"""


def config_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_rate_limits_parse_and_are_named_by_sinks() -> None:
    config = parse(SINK + 'rate_limit = "api"\n[rate_limits.api]\nrate = 100\nper = "10s"\nburst = 20\n')
    assert config.rate_limits["api"] == RateLimitConfig(rate=100, per=Duration(10), burst=20)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            'rate_limit = "nope"\n',
            "$.sinks.out.rate_limit: unknown rate limit 'nope' (known: none configured)",
        ),
        ("[rate_limits.api]\nrate = 0\n", "$.rate_limits.api.rate: Expected `float` > 0"),
        ("[rate_limits.api]\nper = '1s'\n", "$.rate_limits.api: Object missing required field `rate`"),
        ("[rate_limits.api]\nrate = 1\nper = '0s'\n", "$.rate_limits.api.per: must be more than 0s"),
        ("[rate_limits.api]\nrate = 1\nper = 'soon'\n", "$.rate_limits.api.per: invalid duration 'soon'"),
        ("[rate_limits.api]\nrate = 1\nburst = 0\n", "$.rate_limits.api.burst: Expected `int` >= 1"),
        ("[rate_limits.api]\nrate = 1\nbucket = 3\n", "$.rate_limits.api.bucket: unknown key"),
        ("[rate_limits.'a b']\nrate = 1\n", "$.rate_limits.a b: invalid name"),
    ],
)
def test_bad_rate_limits_are_rejected_with_their_path(extra: str, expected: str) -> None:
    found = config_problems(SINK + extra)
    assert any(problem.startswith(expected) for problem in found), found


def test_a_leader_cancelled_while_others_wait_hands_over_the_lead() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", budget(1, per=10))
        await limiter.acquire("x")
        got: list[str] = []

        async def leader(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await limiter.acquire("first")
                got.append("first")

        async def follower() -> None:
            await limiter.acquire("second")
            got.append("second")

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(leader)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        assert got == ["second"]
        assert trio.current_time() == pytest.approx(10)

    run(main)


def test_a_waiter_cancelled_just_after_being_woken_to_lead_passes_the_lead_on() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", budget(1, per=10))
        await limiter.acquire("x")
        got: list[str] = []

        async def waiter(user: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await limiter.acquire(user)
                got.append(user)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                leader = await nursery.start(waiter, "a")
                await trio.testing.wait_all_tasks_blocked()
                woken = await nursery.start(waiter, "b")
                await nursery.start(waiter, "c")
                await trio.testing.wait_all_tasks_blocked()
                leader.cancel()  # "a" hands the lead to "b" ...
                woken.cancel()  # ... which is cancelled before it runs
        assert got == ["c"]

    for _ in range(20):  # trio shuffles who runs first after the two cancellations: try both orders
        run(main)
