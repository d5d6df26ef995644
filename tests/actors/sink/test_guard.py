"""A sink's admission guard on trio's MockClock: failover between URLs, waiting while open, slots."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from actors.sink.guard import SinkGuard, current_url
from daemon.config.limits import AdaptiveConfig, BreakerConfig, RateLimitConfig
from daemon.config.units import Duration
from daemon.errors import DeliveryTimeout, PermanentDelivery, RetryableDelivery
from daemon.limits.ratelimit import RateLimiter
from daemon.telemetry import metrics

PRIMARY, SECONDARY = "http://a.test/x", "http://b.test/x"
BREAKER = BreakerConfig(failures=2, cool_down=Duration(10))
DOWN = RetryableDelivery("connection refused to a.test:80")


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def fail(guard: SinkGuard, error: Exception = DOWN) -> bool:
    admission = await guard.admit()
    assert isinstance(error, RetryableDelivery | PermanentDelivery)
    return admission.done(error, 0.01)


async def succeed(guard: SinkGuard) -> str:
    admission = await guard.admit()
    url = current_url()
    admission.done(None, 0.01)
    assert current_url() is None
    assert url is not None
    return url


def test_failover_to_the_next_url_while_the_primary_is_open_and_back_after_its_probe() -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY, SECONDARY], concurrency=4, breaker=BREAKER)
        assert await succeed(guard) == PRIMARY
        await fail(guard)
        await fail(guard)
        assert guard.status().endpoints[0].state == "open"
        assert [await succeed(guard) for _ in range(3)] == [SECONDARY] * 3
        await trio.sleep(10)
        probe = await guard.admit()
        assert (probe.url, probe.probe) == (PRIMARY, True)
        assert await succeed(guard) == SECONDARY, "others keep using the secondary during the probe"
        probe.done(None, 0.01)
        assert await succeed(guard) == PRIMARY
        assert [e.state for e in guard.status().endpoints] == ["closed", "closed"]

    run(main)


def test_while_every_breaker_is_open_admit_waits_and_one_probe_decides() -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY], concurrency=4, breaker=BREAKER)
        await fail(guard)
        await fail(guard)
        opened = trio.current_time()
        admitted: list[tuple[float, bool]] = []

        async def worker() -> None:
            admission = await guard.admit()
            admitted.append((trio.current_time() - opened, admission.probe))
            await trio.sleep(1)
            admission.done(None, 1.0)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
        assert admitted == [(10, True), (11, False), (11, False)]

    run(main)


def test_a_failed_probe_holds_its_delivery_and_reopens() -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY], concurrency=1, breaker=BREAKER)
        assert not await fail(guard), "an ordinary failure is judged as usual"
        await fail(guard)
        assert await fail(guard), "the probe's failure must not dead-letter"
        status = guard.status()
        assert (status.endpoints[0].state, status.endpoints[0].opens) == ("open", 2)
        assert status.endpoints[0].retry_in_s == 10

    run(main)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RetryableDelivery("HTTP 429", status=429), id="429 is throttling"),
        pytest.param(PermanentDelivery("HTTP 400", status=400), id="400 is the payload"),
    ],
)
def test_answers_that_are_not_the_service_failing_never_open_it(error: Exception) -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY], concurrency=1, breaker=BREAKER)
        for _ in range(5):
            await fail(guard, error)
        assert guard.status().endpoints[0].state == "closed"

    run(main)


def test_a_cancelled_probe_is_handed_to_the_next_caller() -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY], concurrency=2, breaker=BREAKER)
        await fail(guard)
        await fail(guard)
        await trio.sleep(10)
        with await guard.admit() as probe:
            assert probe.probe
        again = await guard.admit()
        assert again.probe
        assert guard.status().in_flight == 1

    run(main)


def test_adaptive_concurrency_holds_admissions_at_the_limit_and_backs_off_on_timeouts() -> None:
    async def main() -> None:
        adaptive = AdaptiveConfig(floor=1, ceiling=8, initial=2, backoff=0.5)
        guard = SinkGuard("crm", [PRIMARY], concurrency=8, adaptive=adaptive)
        first, second = await guard.admit(), await guard.admit()
        with trio.move_on_after(1) as scope:
            await guard.admit()
        assert scope.cancelled_caught, "a third attempt waits for a slot"
        assert guard.status().in_flight == 2
        first.done(DeliveryTimeout("timed out after 10s"), 10.0)
        second.done(None, 0.05)
        assert guard.limit == 1
        assert guard.status().adaptive

    run(main)


def test_the_rate_limit_permit_is_taken_last() -> None:
    async def main() -> None:
        limiter = RateLimiter("api", RateLimitConfig(rate=1, per=Duration(5)))
        guard = SinkGuard("crm", [PRIMARY], concurrency=4, limiter=limiter)
        for _ in range(3):
            (await guard.admit()).done(None, 0.01)
        assert trio.current_time() == 10
        assert limiter.status().granted == {"crm": 3}
        assert guard.status().rate_limit == "api"

    run(main)


def test_the_gauges_follow_the_sink_from_start_to_stop() -> None:
    async def main() -> None:
        adaptive = AdaptiveConfig(floor=1, ceiling=8, initial=3)
        guard = SinkGuard("gauged", [PRIMARY, SECONDARY], concurrency=8, adaptive=adaptive, breaker=BREAKER)
        gauges = metrics.current()
        guard.publish()
        assert gauges.concurrency_limits["gauged"] == 3
        await fail(guard)
        await fail(guard)
        assert gauges.breaker_states[("gauged", PRIMARY)] == 2
        assert gauges.breaker_states[("gauged", SECONDARY)] == 0
        guard.forget()
        assert "gauged" not in gauges.concurrency_limits
        assert not [key for key in gauges.breaker_states if key[0] == "gauged"]

    run(main)


def test_admit_now_gives_what_admit_would_without_waiting_and_nothing_when_it_might_wait() -> None:
    async def main() -> None:
        guard = SinkGuard("crm", [PRIMARY, SECONDARY], concurrency=4, breaker=BREAKER)
        admission = guard.admit_now()
        assert admission is not None
        assert (admission.url, admission.probe) == (PRIMARY, False)
        assert current_url() == PRIMARY
        assert guard.status().in_flight == 1
        admission.done(DOWN, 0.01)
        await fail(guard)  # the primary opens: failover, still at once
        admission = guard.admit_now()
        assert admission is not None
        assert admission.url == SECONDARY
        admission.done(DOWN, 0.01)
        await fail(guard)  # both open: admit() would wait for a cool-down
        assert guard.admit_now() is None
        assert guard.status().in_flight == 0
        await trio.sleep(10)
        probe = guard.admit_now()
        assert probe is not None
        assert (probe.url, probe.probe) == (PRIMARY, True)
        assert [e.state for e in guard.status().endpoints] == ["half-open", "open"]
        probe.cancel()

        adaptive = AdaptiveConfig(floor=1, ceiling=8, initial=1)
        full = SinkGuard("crm", [PRIMARY], concurrency=8, adaptive=adaptive)
        held = full.admit_now()
        assert held is not None
        assert full.admit_now() is None, "the adaptive window is full"
        held.done(None, 0.01)
        assert full.admit_now() is not None

        limiter = RateLimiter("api", RateLimitConfig(rate=1, per=Duration(5)))
        limited = SinkGuard("crm", [PRIMARY], concurrency=4, limiter=limiter)
        assert limited.admit_now() is None, "a permit may have to wait: admit() takes it"
        assert limited.status().in_flight == 0

    run(main)
