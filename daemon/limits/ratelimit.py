"""Named outbound rate limits: one token bucket per budget, shared fairly by every user of it.

`[rate_limits.NAME]` builds one `RateLimiter`; every poller, sink and lookup whose config says
`rate_limit = "NAME"` calls `await limiter.acquire(user)` before each request and
`limiter.feedback(status, headers)` with each answer. `RateLimits` holds them all, built once
per daemon (`Running.rate_limits`) and updated in place by a reload.

Guarantee:
    Over any interval of length T at most `burst + rate * T / per` permits are granted (the
    token bucket of `TokenBucket.take`). A permit is granted at most once; one granted to a
    caller that is cancelled at that very moment is lost, never handed out twice: the
    budget errs on the side of fewer requests.

Fairness:
    Callers that must wait queue per user (a sink, a poller — whatever name they pass); each
    free permit goes to the next user in round-robin order, and to that user's oldest waiter.
    A sink with 64 workers and a poller with one therefore get a permit each in turn, not
    64 to 1. While nobody waits, `acquire` takes a permit without queueing (the fast path).

Feedback (`pause_from`):
    `Retry-After` (seconds or an HTTP date) on a 429 or 503, and `RateLimit-Remaining: 0` or
    `X-RateLimit-Remaining: 0` with their `-Reset` (or the combined `RateLimit` field) pause the
    *whole* budget until that reset: no user gets a permit before it. A pause never shortens
    an earlier one and is capped at `MAX_PAUSE`.

Cancellation:
    `acquire` is cancellable at any point; a cancelled waiter leaves the queue, and one that
    was handing out permits (the "leader", see `_wait`) passes that job on first.

Cluster-wide (`RateLimits(budgets=…)`, on PostgreSQL):
    The bucket is shared by every node: the limiter keeps a `SharedBucket`
    (`daemon.limits.shared`) that takes permits from the database in batches, one round trip
    per batch, and a pause seen here is written there for the other nodes. Queues, fairness and
    cancellation above are unchanged; the bound becomes the cluster's (see that module).
    Breakers and adaptive concurrency (AIMD) stay per node.

Clock: buckets and waits run on trio's (`trio.current_time()`); the wall clock that HTTP dates and
Unix-time resets are read against is injected (`wall`, `time.time` in the daemon). So tests run
on `trio.testing.MockClock` with a wall clock it moves.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, final

import trio
from msgspec import Struct

from daemon.config.limits import RateLimitConfig
from daemon.http.client import parse_retry_after
from daemon.limits.shared import SharedBucket
from daemon.store.budgets import Budgets
from daemon.telemetry import metrics

__all__ = ["MAX_PAUSE", "RateLimitStatus", "RateLimiter", "RateLimits", "TokenBucket", "pause_from"]

log = logging.getLogger("ferry.ratelimit")

MAX_PAUSE: Final = 3600.0
"""Longest pause one answer can impose: a bogus reset header must not stop a budget for days."""
_EPOCH_FLOOR: Final = 1e9  # an X-RateLimit-Reset this large is a Unix time, not a delay
_WHOLE: Final = 1.0 - 1e-9  # a permit short by rounding error only is a permit: no endless tiny waits
_REMAINING: Final = ("ratelimit-remaining", "x-ratelimit-remaining", "ratelimit")


@final
class TokenBucket:
    """The pure core: a token bucket of `burst` permits refilled at `rate` per `per` seconds.

    `take(now)` takes one permit and returns 0.0 when one is there; otherwise it takes nothing
    and returns the seconds until one will be. `now` is any monotonic clock in seconds.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "interval", "paused_until")

    def __init__(self, rate: float, per: float, burst: int) -> None:
        self.interval = per / rate  # seconds per permit
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None  # when `_tokens` was last brought up to date
        self.paused_until = -math.inf

    def __repr__(self) -> str:
        return f"<TokenBucket [every {self.interval:g}s, burst {self.burst}, tokens {self._tokens:.2f}]>"

    def _refill(self, now: float) -> float:
        if self._stamp is None or now < self._stamp:
            self._stamp = now if self._stamp is None else self._stamp
            return self._tokens
        tokens = min(float(self.burst), self._tokens + (now - self._stamp) / self.interval)
        self._tokens, self._stamp = tokens, now
        return tokens

    def take(self, now: float) -> float:
        if now < self.paused_until:
            return self.paused_until - now
        tokens = self._refill(now)
        if tokens >= _WHOLE:
            self._tokens = max(0.0, tokens - 1.0)
            return 0.0
        return (1.0 - tokens) * self.interval

    def available(self, now: float) -> float:
        """Permits that could be taken at `now` (fractional; 0 while paused)."""
        return 0.0 if now < self.paused_until else self._refill(now)

    def pause_until(self, when: float, now: float) -> bool:
        """Grant nothing before `when`; then start from one permit. False if it changes nothing."""
        if when <= max(now, self.paused_until):
            return False
        self.paused_until = when
        self._tokens, self._stamp = 1.0, when
        return True

    def reconfigure(self, rate: float, per: float, burst: int) -> None:
        """New rate and size; the permits already there are kept (up to the new size)."""
        self.interval, self.burst = per / rate, burst
        self._tokens = min(self._tokens, float(burst))


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


_FIELD_PARAM = re.compile(r"(?:^|[;,\s])(r|t|remaining|reset)\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


_PARAM_NAMES: Final = {"r": "r", "remaining": "r", "t": "t", "reset": "t"}


def _reset_delay(remaining: float | None, reset: float | None, wall: float) -> float | None:
    if remaining is None or reset is None or remaining >= 1:
        return None
    return reset - wall if reset >= _EPOCH_FLOOR else reset


def pause_from(status: int, headers: Mapping[str, str], wall: float | None = None) -> float | None:
    """Seconds the whole budget must pause after an answer, or None (pure: no clock but `wall`).

    `headers` has lower-case names (or is case-insensitive, like `httpx.Headers`). `wall` is the
    Unix time used for HTTP dates and Unix-time resets, `time.time()` by default. Read:

    - `Retry-After` on a 429 or 503 (seconds or an HTTP date);
    - `RateLimit-Remaining: 0` + `RateLimit-Reset` (delay seconds, IETF draft) and the combined
      `RateLimit: "default";r=0;t=30` / `remaining=0, reset=30` field;
    - `X-RateLimit-Remaining: 0` + `X-RateLimit-Reset` (delay seconds, or a Unix time when it
      is at least 1e9, as GitHub sends).

    The longest of them wins, capped at `MAX_PAUSE`.
    """
    wall = time.time() if wall is None else wall
    found: list[float] = []
    if status in (429, 503):
        retry_after = parse_retry_after(headers.get("retry-after"), wall)
        if retry_after is not None:
            found.append(retry_after)
    for prefix in ("ratelimit-", "x-ratelimit-"):
        delay = _reset_delay(
            _number(headers.get(prefix + "remaining")), _number(headers.get(prefix + "reset")), wall
        )
        if delay is not None:
            found.append(delay)
    combined = headers.get("ratelimit")
    if combined:
        params = {_PARAM_NAMES[key.lower()]: float(value) for key, value in _FIELD_PARAM.findall(combined)}
        delay = _reset_delay(params.get("r"), params.get("t"), wall)
        if delay is not None:
            found.append(delay)
    pause = max(found, default=0.0)
    return min(pause, MAX_PAUSE) if pause > 0 else None


class RateLimitStatus(Struct, frozen=True):
    """One budget as `ferry ctl status` shows it."""

    rate: float
    per_s: float
    burst: int
    available: float  # permits that could be taken now
    paused_for_s: float  # until a server's reset; 0 when not paused
    waiting: int  # callers queued for a permit
    granted: dict[str, int]  # permits per user since start
    waits: int  # acquires that had to queue
    pauses: int  # answers that paused the budget
    shared: bool = False  # cluster-wide: permits come from the database
    round_trips: int = 0  # grant requests that reached the database (shared only)


@dataclass(eq=False, slots=True)
class _Waiter:
    user: str
    wake: trio.Event
    granted: bool = False


@final
class RateLimiter:
    """One named budget: `acquire(user)` one permit, `feedback(status, headers)`; see the module docs."""

    def __init__(
        self,
        name: str,
        config: RateLimitConfig,
        wall: Callable[[], float] = time.time,
        budgets: Budgets | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._wall = wall
        self._bucket: TokenBucket | SharedBucket = (
            TokenBucket(config.rate, config.per, config.burst)
            if budgets is None
            else SharedBucket(name, config.rate, config.per, config.burst, budgets)
        )
        self._pause_to_share: float | None = None  # a pause (trio time) not yet written for the cluster
        self._queues: dict[str, deque[_Waiter]] = {}
        self._turns: deque[str] = deque()  # users with waiters, next to be served first
        self._leading = False
        self._changed = trio.Event()
        self.granted: Counter[str] = Counter()
        self.waits = 0
        self.pauses = 0

    def __repr__(self) -> str:
        waiting = sum(len(queue) for queue in self._queues.values())
        return (
            f"<RateLimiter {self.name} [{self.config.rate:g} per {self.config.per:g}s | waiting: {waiting}]>"
        )

    async def acquire(self, user: str) -> None:
        """Wait for one permit of this budget, taking turns with its other users."""
        if not self._turns and not self._leading and self._bucket.take(trio.current_time()) == 0.0:
            self.granted[user] += 1
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self._wait(user)

    async def _wait(self, user: str) -> None:
        """Queue for a permit. One waiter at a time "leads": it sleeps until the bucket has a
        permit and hands it to whoever's turn it is, until its own turn comes; then the lead
        passes to the next waiter. No background task, so a limiter works wherever it is used."""
        waiter = _Waiter(user, trio.Event())
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = deque()
            self._turns.append(user)
        queue.append(waiter)
        began = trio.current_time()
        try:
            while not waiter.granted:
                if self._leading:
                    await waiter.wake.wait()
                    waiter.wake = trio.Event()
                    continue
                self._leading = True
                try:
                    await self._lead(waiter)
                finally:
                    self._leading = False
                    self._remove(waiter)
                    self._wake_leader()
        finally:
            if not waiter.granted:
                self._remove(waiter)
                if not self._leading:  # it may have been woken to lead: pass that on
                    self._wake_leader()
        self.waits += 1
        self.granted[user] += 1
        meter = metrics.current()
        attributes = {"limit": self.name, "user": user}
        meter.ratelimit_waits.add(1, attributes)
        meter.ratelimit_wait_time.record(trio.current_time() - began, attributes)

    async def _lead(self, me: _Waiter) -> None:
        bucket = self._bucket
        while not me.granted:
            wait = bucket.take(trio.current_time())
            if wait == math.inf and isinstance(bucket, SharedBucket):
                wait = await bucket.refill(sum(len(queue) for queue in self._queues.values()))
                if wait == 0.0:
                    continue
            if wait > 0.0:
                with trio.move_on_after(wait):
                    await self._changed.wait()  # a reconfiguration may shorten the wait
                continue
            user = self._turns.popleft()
            queue = self._queues[user]
            waiter = queue.popleft()
            if queue:
                self._turns.append(user)
            else:
                del self._queues[user]
            waiter.granted = True
            waiter.wake.set()

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.user)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.user]
            self._turns.remove(waiter.user)

    def _wake_leader(self) -> None:
        if self._turns:
            self._queues[self._turns[0]][0].wake.set()

    def feedback(self, status: int, headers: Mapping[str, str]) -> None:
        """Learn from one answer: pause the whole budget if it says so (see `pause_from`)."""
        if status not in (429, 503) and not any(name in headers for name in _REMAINING):
            return
        pause = pause_from(status, headers, self._wall())
        if pause is None:
            return
        now = trio.current_time()
        if self._bucket.pause_until(now + pause, now):
            if isinstance(self._bucket, SharedBucket):
                self._share_pause(now + pause)
            self.pauses += 1
            metrics.current().ratelimit_pauses.add(1, {"limit": self.name})
            log.info(
                "rate limit paused by the server",
                extra={"fields": {"limit": self.name, "status": status, "pause_s": round(pause, 3)}},
            )

    def _share_pause(self, until: float) -> None:
        """Write the pause for the other nodes from a task of its own (`feedback` is synchronous):
        one writer at a time per budget, the latest pause winning."""
        writing = self._pause_to_share is not None
        self._pause_to_share = until
        if not writing:
            trio.lowlevel.spawn_system_task(self._write_pauses, name=f"ratelimit {self.name} share pause")

    async def _write_pauses(self) -> None:
        bucket = self._bucket
        assert isinstance(bucket, SharedBucket)
        try:
            while (until := self._pause_to_share) is not None:
                await bucket.share_pause(until - trio.current_time())
                if self._pause_to_share == until:
                    self._pause_to_share = None
        except Exception:  # a system task must not raise: that would end the daemon
            self._pause_to_share = None
            log.exception("rate budget pause not shared", extra={"fields": {"limit": self.name}})

    def reconfigure(self, config: RateLimitConfig) -> None:
        """Apply a reloaded config; waiters, pauses and the permits in hand are kept."""
        if config == self.config:
            return
        self.config = config
        self._bucket.reconfigure(config.rate, config.per, config.burst)
        self._changed.set()
        self._changed = trio.Event()

    def status(self) -> RateLimitStatus:
        now = trio.current_time()
        bucket = self._bucket
        return RateLimitStatus(
            rate=self.config.rate,
            per_s=float(self.config.per),
            burst=self.config.burst,
            available=round(bucket.available(now), 3),
            paused_for_s=round(max(0.0, bucket.paused_until - now), 3),
            waiting=sum(len(queue) for queue in self._queues.values()),
            granted=dict(self.granted),
            waits=self.waits,
            pauses=self.pauses,
            shared=isinstance(bucket, SharedBucket),
            round_trips=bucket.round_trips if isinstance(bucket, SharedBucket) else 0,
        )


@final
class RateLimits(Mapping[str, RateLimiter]):
    """Every configured budget by name; one per daemon, reachable from the actors. `wall`: the
    daemon's wall clock, handed to every limiter."""

    def __init__(
        self,
        configs: Mapping[str, RateLimitConfig] | None = None,
        wall: Callable[[], float] = time.time,
        *,
        budgets: Budgets | None = None,
    ) -> None:
        self._limiters: dict[str, RateLimiter] = {}
        self._wall = wall
        self.budgets = budgets
        """Where cluster-wide budgets live (PostgreSQL), or None: each budget is this process's."""
        self.update(configs or {})

    def __getitem__(self, name: str) -> RateLimiter:
        return self._limiters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._limiters)

    def __len__(self) -> int:
        return len(self._limiters)

    def limiter(self, name: str | None) -> RateLimiter | None:
        """The budget a `rate_limit` field names (None for None); config validation made sure it exists."""
        return None if name is None else self._limiters[name]

    def update(self, configs: Mapping[str, RateLimitConfig]) -> None:
        """Apply a (re)loaded config: changed budgets are reconfigured in place (their users keep
        the same object and queue), new ones added, removed ones forgotten."""
        for name, config in configs.items():
            limiter = self._limiters.get(name)
            if limiter is None:
                self._limiters[name] = RateLimiter(name, config, self._wall, self.budgets)
            else:
                limiter.reconfigure(config)
        for name in [name for name in self._limiters if name not in configs]:
            del self._limiters[name]
