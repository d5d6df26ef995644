"""A node's side of a cluster-wide rate budget: permits taken from the database in small batches.

With `[store] backend = "postgres"` every `RateLimiter` keeps a `SharedBucket` instead of its own
`TokenBucket`: the token bucket itself is a row in the database (`daemon.store.pg_budgets`), on
the database's clock, and every node of the cluster takes its permits from that one row. On SQLite
(one node) nothing here runs: the limiter's in-memory bucket is the budget.

Batches (why this and not "shares by live node count": docs/limits.md#cluster-wide-budgets):
    The limiter's leader asks for as many permits as callers are waiting for, at most
    `MAX_BATCH`, in one round trip, and hands them out as soon as the shared bucket has paid for
    them (a grant may reserve what the refill pays within `pg_budgets.AHEAD_S`, so that nodes
    asking together queue in the row instead of racing for each token). Nothing is taken ahead
    of demand, so permits do not sit on one node while another starves. A permit still held
    `HOLD_S` after it became usable (its waiter was cancelled) is dropped, never used late. So
    the cluster starts at most `burst + rate * (T + HOLD_S)` requests over any interval T — the
    single process's bound plus at most `rate * HOLD_S` permits, and only if callers are
    cancelled while holding permits. Round trips: one per batch, so at most one per permit (a
    single sequential caller) and 1/`MAX_BATCH` per permit under heavy concurrency.

Feedback:
    A `Retry-After` or exhausted quota seen by any node pauses its own bucket at once (as on one
    node) and is written to the budget row (`blocked_until`, database time); every other node
    learns it with its next grant request, which grants nothing until then. Permits a node holds
    are dropped when it learns of a pause.

Database slow or down — fails closed:
    A failed or timed-out round trip grants nothing; the leader tries again after a capped
    exponential backoff (`MAX_BACKOFF_S`). Callers wait (cancellably) until the database answers.
    No local fallback: a budget exists because the upstream API punishes excess, and a node that
    cannot reach the database cannot claim or record deliveries or commit poll pages either, so
    fallback permits would buy nothing but the risk of exceeding the budget N times over.

Cancellation: a leader cancelled during a round trip loses that batch (it is never handed out
twice): the budget errs on the side of fewer requests.
"""

from __future__ import annotations

import logging
import math
from typing import Final, final

import trio

from daemon.errors import StoreUnavailable
from daemon.store.budgets import Budgets

__all__ = ["HOLD_S", "MAX_BACKOFF_S", "MAX_BATCH", "SharedBucket"]

log = logging.getLogger("ferry.ratelimit")

MAX_BATCH: Final = 32
"""Most permits one round trip asks for (bench/budget.py: round trips per permit vs batch)."""
HOLD_S: Final = 0.5
"""A permit not handed out this long after its grant is dropped (its waiters were cancelled)."""
MAX_BACKOFF_S: Final = 2.0
"""Longest wait between two failed round trips."""
_FIRST_BACKOFF_S: Final = 0.05
_MIN_WAIT_S: Final = 0.001  # a wait the database reports as ~0 (a rounding race) still yields


@final
class SharedBucket:
    """Permits of one budget held on this node, refilled from the cluster's row by `refill`.

    The synchronous part mirrors `TokenBucket` (`take(now)` hands out a held permit or says how
    long to wait; `math.inf` means "nothing held: call `refill`"), so `RateLimiter` queues,
    fairness and pauses work unchanged.
    """

    __slots__ = (
        "_backoff_until",
        "_budgets",
        "_held",
        "_held_from",
        "_held_until",
        "burst",
        "failures",
        "interval",
        "name",
        "paused_until",
        "per",
        "rate",
        "round_trips",
    )

    def __init__(self, name: str, rate: float, per: float, burst: int, budgets: Budgets) -> None:
        self.name = name
        self._budgets = budgets
        self.rate, self.per, self.burst = rate, per, burst
        self.interval = per / rate
        self._held = 0
        self._held_from = self._held_until = -math.inf
        self._backoff_until = -math.inf
        self.paused_until = -math.inf
        self.failures = 0  # consecutive failed round trips
        self.round_trips = 0

    def __repr__(self) -> str:
        return f"<SharedBucket {self.name} [every {self.interval:g}s, burst {self.burst}, held {self._held}]>"

    def take(self, now: float) -> float:
        if now < self.paused_until:
            return self.paused_until - now
        if self._held and now < self._held_until:
            if now < self._held_from:  # reserved: usable once the shared bucket has paid for it
                return self._held_from - now
            self._held -= 1
            return 0.0
        self._held = 0
        return math.inf

    def available(self, now: float) -> float:
        """Permits held on this node now (0 while paused)."""
        return float(self._held) if max(self.paused_until, self._held_from) <= now < self._held_until else 0.0

    def pause_until(self, when: float, now: float) -> bool:
        """Grant nothing here before `when` and drop the permits held; False if it changes nothing."""
        if when <= max(now, self.paused_until):
            return False
        self.paused_until = when
        self._held = 0
        return True

    def reconfigure(self, rate: float, per: float, burst: int) -> None:
        """The next round trip passes the new rate and burst (the row's tokens are capped to it)."""
        self.rate, self.per, self.burst = rate, per, burst
        self.interval = per / rate

    async def refill(self, want: int) -> float:
        """One round trip for up to `want` permits: 0.0 when some are usable now; else the seconds
        until the permits granted may be used, or to wait before asking again (a pause learned
        from another node, the next token, or the backoff after a failure)."""
        now = trio.current_time()
        if now < self._backoff_until:
            return self._backoff_until - now
        try:
            grant = await self._budgets.take(
                self.name, min(max(want, 1), MAX_BATCH), self.rate / self.per, self.burst
            )
        except StoreUnavailable as exc:
            self.failures += 1
            backoff = min(MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2.0 ** min(self.failures - 1, 16))
            self._backoff_until = trio.current_time() + backoff
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning(
                    "rate budget unavailable: granting nothing until the database answers",
                    extra={"fields": {"limit": self.name, "failures": self.failures, "error": str(exc)}},
                )
            return backoff
        self.round_trips += 1
        if self.failures:
            log.info("rate budget available again", extra={"fields": {"limit": self.name}})
        self.failures = 0
        now = trio.current_time()
        if grant.blocked_for_s > 0:
            self.pause_until(now + grant.blocked_for_s, now)
        if grant.granted:
            start = now + grant.start_in_s
            self._held, self._held_from, self._held_until = grant.granted, start, start + HOLD_S
            return grant.start_in_s
        return max(grant.next_in_s, _MIN_WAIT_S)

    async def share_pause(self, pause_s: float) -> None:
        """Write a pause seen here to the budget row, so other nodes hold back too (fails quietly:
        this node's own pause stands, and the others find their own 429s)."""
        try:
            await self._budgets.block(self.name, pause_s, self.rate / self.per, self.burst)
        except StoreUnavailable as exc:
            log.warning(
                "rate budget pause not shared: the database did not answer",
                extra={"fields": {"limit": self.name, "pause_s": round(pause_s, 3), "error": str(exc)}},
            )
