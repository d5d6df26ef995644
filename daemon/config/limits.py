"""Config of ferry's outbound limits: named rate-limit budgets, adaptive concurrency, circuit breakers.

`[rate_limits.NAME]` tables are budgets that any poller, sink or lookup names in its
`rate_limit` field; `adaptive = { … }` and `breaker = { … }` belong to an http sink.
Semantics and the reasons behind the defaults: docs/limits.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from msgspec import Meta

from daemon.config.base import Section, default
from daemon.config.units import Duration

__all__ = ["AdaptiveConfig", "BreakerConfig", "RateLimitConfig", "limit_errors"]


class RateLimitConfig(Section, frozen=True):
    """A budget of outbound requests shared by every poller, sink and lookup naming it in `rate_limit`.

    A token bucket: it holds at most `burst` permits and refills at `rate` per `per`, so over any
    interval of length T at most `burst + rate * T / per` requests start. Its users take turns
    (round robin), and a `Retry-After` or an exhausted `RateLimit-Remaining` in any answer pauses
    the whole budget until the server's reset (docs/limits.md).
    """

    rate: Annotated[float, Meta(gt=0, description="Requests allowed per `per`.")]
    per: Annotated[Duration, Meta(description="The period `rate` is counted over (more than 0s).")] = default(
        Duration(1)
    )
    burst: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="Most requests that may start back to back after a quiet spell (the bucket's "
            "size); 1 spaces every request evenly.",
        ),
    ] = 1


class AdaptiveConfig(Section, frozen=True):
    """AIMD bounds of `concurrency = "adaptive"`: the limit grows by one per window of good answers and
    shrinks by `backoff` on a 429, a 503, a timeout or a latency past `tolerance` x the baseline."""

    floor: Annotated[int, Meta(ge=1, le=1024, description="Fewest requests in flight the limit allows.")] = 1
    ceiling: Annotated[int, Meta(ge=1, le=1024, description="Most requests in flight the limit allows.")] = 64
    initial: Annotated[
        Annotated[int, Meta(ge=1, le=1024)] | None, Meta(description="Limit at start; unset: `floor`.")
    ] = None
    backoff: Annotated[
        float, Meta(gt=0, lt=1, description="Factor the limit is multiplied by on an overload signal.")
    ] = 0.7
    tolerance: Annotated[
        float,
        Meta(
            ge=1,
            description="A request slower than this many times the baseline latency (and at least "
            "`slack` slower) counts as an overload signal.",
        ),
    ] = 2.0
    slack: Annotated[
        Duration, Meta(description="Latency increase always tolerated, whatever the baseline.")
    ] = default(Duration(0.05))


class BreakerConfig(Section, frozen=True):
    """A circuit breaker per target URL: opens after `failures` consecutive failed attempts or a failure
    share of `rate` over `window`; after `cool_down` one probe request decides whether it closes.

    Failures are transport errors, timeouts, 408 and 5xx answers; a 429 is throttling (the rate
    limit's business) and other 4xx are the payload's fault, so neither counts. While a breaker is
    open its deliveries wait in the store: no attempts counted, never dead-lettered.
    """

    failures: Annotated[
        int, Meta(ge=1, le=1_000_000, description="Consecutive failed attempts that open the breaker.")
    ] = 5
    rate: Annotated[
        float,
        Meta(
            gt=0,
            le=1,
            description="Share of failed attempts within `window` that opens the breaker "
            "(judged once `min_requests` attempts ended in the window).",
        ),
    ] = 0.5
    window: Annotated[Duration, Meta(description="Sliding window for `rate` (more than 0s).")] = default(
        Duration(30)
    )
    min_requests: Annotated[
        int, Meta(ge=1, le=1_000_000, description="Attempts within `window` before `rate` is judged.")
    ] = 20
    cool_down: Annotated[
        Duration, Meta(description="How long an open breaker waits before its one probe (more than 0s).")
    ] = default(Duration(30))


def limit_errors(
    rate_limits: Mapping[str, RateLimitConfig], components: Mapping[str, Mapping[str, Any]]
) -> Iterator[str]:
    """Config paths of invalid limit settings: zero periods, unknown budget names, bad bounds.

    `components` maps a kind (`sources`, `sinks`, …) to its named components; any of them with a
    `rate_limit` field is checked, whatever its type.
    """
    for name, budget in rate_limits.items():
        if budget.per <= 0:
            yield f"$.rate_limits.{name}.per: must be more than 0s"
    known = ", ".join(sorted(rate_limits)) or "none configured"
    for kind, table in components.items():
        for name, component in table.items():
            where = f"$.{kind}.{name}"
            budget_name = getattr(component, "rate_limit", None)
            if budget_name is not None and budget_name not in rate_limits:
                yield f"{where}.rate_limit: unknown rate limit {budget_name!r} (known: {known})"
            adaptive = getattr(component, "adaptive", None)
            if isinstance(adaptive, AdaptiveConfig):
                if adaptive.floor > adaptive.ceiling:
                    yield f"{where}.adaptive.floor: larger than ceiling"
                if (
                    adaptive.initial is not None
                    and not adaptive.floor <= adaptive.initial <= adaptive.ceiling
                ):
                    yield f"{where}.adaptive.initial: outside floor..ceiling"
            breaker = getattr(component, "breaker", None)
            if isinstance(breaker, BreakerConfig):
                for key in ("window", "cool_down"):
                    if getattr(breaker, key) <= 0:
                        yield f"{where}.breaker.{key}: must be more than 0s"
