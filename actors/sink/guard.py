"""Admission of one http sink's attempts: adaptive concurrency, a circuit breaker per URL, the rate limit.

A sink worker calls `await guard.admit()` before each attempt and `admission.done(error,
elapsed)` after it (or `admission.cancel()` when it does not send after all). `admit`
waits, in this order, for:

1. a concurrency slot, with `concurrency = "adaptive"`: at most `Aimd.current` attempts in
   flight (daemon/limits/concurrency.py);
2. a usable URL (failover): the first of `urls` whose breaker is closed, or whose cool-down
   is over (that request is the breaker's one probe). While every breaker is open it sleeps
   until the soonest cool-down ends or a probe's result arrives;
3. a permit of the sink's `rate_limit` budget.

Delivery: nothing is sent, and no attempt is counted, while `admit` waits: the deliveries
stay pending in the store (a worker holds at most one batch in memory). A failed probe
keeps its delivery pending whatever its attempt and age limits (`Admission.done` returns
True: "hold"), so an outage never dead-letters anything; it costs one attempt of one
delivery per cool-down.

What counts as a failure for a breaker: a retryable error without a status (transport
error, timeout), a 408 or a 5xx. For adaptive concurrency, an overload: a 429, a 503, a
timeout, or a latency the AIMD rule judges congested.

Cancellation: `admit` may be cancelled anywhere and gives back what it took (slot, probe);
an `Admission` used as a context manager is cancelled on exit unless `done` was called.
The URL of the admission current in a task is what `HttpSender` sends to (`current_url`).
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from types import TracebackType
from typing import final

import trio
from msgspec import Struct

from daemon.config.limits import AdaptiveConfig, BreakerConfig
from daemon.errors import DeliveryError, DeliveryTimeout, RetryableDelivery
from daemon.limits.breaker import Admit, Breaker, State
from daemon.limits.concurrency import Aimd
from daemon.limits.ratelimit import RateLimiter
from daemon.telemetry import metrics

__all__ = ["Admission", "GuardStatus", "SinkGuard", "current_url"]

log = logging.getLogger("ferry.sink")

OVERLOAD_STATUSES = frozenset({429, 503})

_admitted: ContextVar[Admission | None] = ContextVar("ferry_admission", default=None)


def current_url() -> str | None:
    """The URL the attempt running in this task was admitted to (None outside one)."""
    admission = _admitted.get()
    return admission.url if admission is not None else None


def is_failure(error: DeliveryError | None) -> bool:
    """Does this attempt's error count against a breaker (the service, not the payload, failed)?"""
    if not isinstance(error, RetryableDelivery):
        return False
    return error.status is None or error.status == 408 or error.status >= 500


def is_overload(error: DeliveryError | None) -> bool:
    """Does this attempt's error tell adaptive concurrency to back off?"""
    return isinstance(error, DeliveryTimeout) or (error is not None and error.status in OVERLOAD_STATUSES)


class EndpointStatus(Struct, frozen=True):
    url: str
    state: str  # closed | half-open | open | no breaker
    opens: int  # times it opened since start
    retry_in_s: float | None  # until the probe, while open


class GuardStatus(Struct, frozen=True):
    """A sink's admission state as `ferry ctl status` shows it."""

    concurrency: int  # the current limit (fixed, or adaptive)
    adaptive: bool
    in_flight: int
    endpoints: list[EndpointStatus]
    rate_limit: str | None


@final
class Admission:
    """One admitted attempt: where it goes and whether it is a probe. See the module docstring."""

    __slots__ = ("_finished", "_guard", "epoch", "index", "probe", "url")

    def __init__(self, guard: SinkGuard, index: int, url: str, *, probe: bool, epoch: int) -> None:
        self._guard, self.index, self.url, self.probe, self.epoch = guard, index, url, probe, epoch
        self._finished = False
        _admitted.set(self)

    def __repr__(self) -> str:
        return f"<Admission {self._guard.name} -> {self.url}{' (probe)' if self.probe else ''}>"

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    def done(self, error: DeliveryError | None, elapsed: float) -> bool:
        """Report the attempt's result; True when a failure must not dead-letter (a failed probe)."""
        if self._finished:
            return False
        self._end()
        return self._guard._result(self, error, elapsed)

    def cancel(self) -> None:
        """Nothing was sent: give the slot (and the probe) back."""
        if self._finished:
            return
        self._end()
        self._guard._cancelled(self)

    def _end(self) -> None:
        self._finished = True
        if _admitted.get() is self:
            _admitted.set(None)


@final
class SinkGuard:
    """Admission for one sink; one per sink, outliving restarts of its actor."""

    def __init__(
        self,
        name: str,
        urls: list[str],
        *,
        concurrency: int,
        adaptive: AdaptiveConfig | None = None,
        breaker: BreakerConfig | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.name = name
        self.urls = urls
        self.limiter = limiter
        self._fixed = concurrency
        self._aimd = Aimd(adaptive) if adaptive is not None else None
        self._breakers = [Breaker(breaker) for _ in urls] if breaker is not None else []
        self._in_flight = 0
        self._freed = trio.Event()  # a slot was given back
        self._changed = trio.Event()  # a breaker changed state

    def __repr__(self) -> str:
        pairs = zip(self.urls, self._breakers, strict=False)
        states = "".join(f"; {url} {breaker.state.label}" for url, breaker in pairs)
        return f"<SinkGuard {self.name} [limit {self.limit}, in flight {self._in_flight}{states}]>"

    @property
    def limit(self) -> int:
        """Attempts allowed in flight now."""
        return self._aimd.current if self._aimd is not None else self._fixed

    async def admit(self) -> Admission:
        """Wait until an attempt may start; see the module docstring."""
        aimd = self._aimd
        if aimd is not None:
            while self._in_flight >= aimd.current:
                await self._freed.wait()
        self._in_flight += 1
        try:
            index, probe = await self._endpoint()
            try:
                if self.limiter is not None:
                    await self.limiter.acquire(self.name)
            except BaseException:
                if probe:
                    self._breakers[index].cancel_probe()
                raise
        except BaseException:
            self._release()
            raise
        return Admission(self, index, self.urls[index], probe=probe, epoch=aimd.epoch if aimd else 0)

    def admit_now(self) -> Admission | None:
        """What `admit()` would give at once, taken without a checkpoint (a trip through trio's
        scheduler per attempt, for a sink whose guard never makes it wait); None when `admit()`
        might have to wait — a full adaptive window, a rate limit, no breaker letting an attempt
        through — and is to be called instead. The caller's request is its checkpoint."""
        aimd = self._aimd
        if self.limiter is not None or (aimd is not None and self._in_flight >= aimd.current):
            return None
        picked = self._pick(trio.current_time()) if self._breakers else (0, False)
        if picked is None:
            return None
        self._in_flight += 1
        index, probe = picked
        return Admission(self, index, self.urls[index], probe=probe, epoch=aimd.epoch if aimd else 0)

    async def _endpoint(self) -> tuple[int, bool]:
        """(index of the URL to use, whether this is its probe), waiting while no breaker allows one."""
        if not self._breakers:
            await trio.lowlevel.checkpoint()
            return 0, False
        while True:
            now = trio.current_time()
            picked = self._pick(now)
            if picked is not None:
                await trio.lowlevel.checkpoint()
                return picked
            soonest = min(
                (breaker.retry_at for breaker in self._breakers if breaker.state is State.OPEN),
                default=math.inf,
            )
            changed = self._changed
            with trio.move_on_at(soonest):
                await changed.wait()

    def _pick(self, now: float) -> tuple[int, bool] | None:
        """(index, probe) of the first URL whose breaker lets an attempt through at `now`, or None."""
        for index, breaker in enumerate(self._breakers):
            was = breaker.state
            verdict = breaker.allow(now)
            if breaker.state is not was:
                self._publish(index)
            if verdict is not Admit.NO:
                return index, verdict is Admit.PROBE
        return None

    def publish(self) -> None:
        """Report every gauge (`ferry.breaker.state`, `ferry.sink.concurrency`): the sink started."""
        gauges = metrics.current()
        for url, breaker in zip(self.urls, self._breakers, strict=False):
            gauges.breaker_states[(self.name, url)] = breaker.state
        if self._aimd is not None:
            gauges.concurrency_limits[self.name] = self._aimd.current

    def forget(self) -> None:
        """Stop reporting the gauges: the sink stopped (a reload may have removed it)."""
        gauges = metrics.current()
        for url in self.urls:
            gauges.breaker_states.pop((self.name, url), None)
        gauges.concurrency_limits.pop(self.name, None)

    def _release(self) -> None:
        self._in_flight -= 1
        self._freed.set()
        self._freed = trio.Event()

    def _cancelled(self, admission: Admission) -> None:
        self._release()
        if admission.probe:
            self._breakers[admission.index].cancel_probe()
            self._wake()

    def _result(self, admission: Admission, error: DeliveryError | None, elapsed: float) -> bool:
        in_flight = self._in_flight
        self._release()
        failed = is_failure(error)
        if self._breakers:
            breaker = self._breakers[admission.index]
            if breaker.record(trio.current_time(), failed=failed, probe=admission.probe):
                self._publish(admission.index, error)
                self._wake()
        aimd = self._aimd
        if aimd is not None and aimd.on_result(
            elapsed, overloaded=is_overload(error), epoch=admission.epoch, in_flight=in_flight
        ):
            metrics.current().concurrency_limits[self.name] = aimd.current
        return admission.probe and failed

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _publish(self, index: int, error: DeliveryError | None = None) -> None:
        """A breaker changed state: gauge, log line."""
        breaker, url = self._breakers[index], self.urls[index]
        metrics.current().breaker_states[(self.name, url)] = breaker.state
        fields: dict[str, object] = {"sink": self.name, "url": url, "state": breaker.state.label}
        if breaker.state is State.OPEN:
            fields["retry_in_s"] = round(breaker.retry_at - trio.current_time(), 3)
            if error is not None:
                fields["error"] = str(error)[:200]
            log.warning("circuit breaker open: deliveries wait in the store", extra={"fields": fields})
        elif breaker.state is State.CLOSED:
            log.info("circuit breaker closed: deliveries resume", extra={"fields": fields})
        else:
            log.info("circuit breaker half-open: sending one probe", extra={"fields": fields})

    def status(self) -> GuardStatus:
        now = trio.current_time()
        endpoints = [
            EndpointStatus(
                url,
                breaker.state.label,
                breaker.opens,
                round(max(0.0, breaker.retry_at - now), 3) if breaker.state is State.OPEN else None,
            )
            for url, breaker in zip(self.urls, self._breakers, strict=False)
        ] or [EndpointStatus(url, "no breaker", 0, None) for url in self.urls]
        return GuardStatus(
            concurrency=self.limit,
            adaptive=self._aimd is not None,
            in_flight=self._in_flight,
            endpoints=endpoints,
            rate_limit=self.limiter.name if self.limiter is not None else None,
        )
