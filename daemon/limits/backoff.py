"""Retry schedules as pure functions: exponential backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Callable


def ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The backoff ceiling after failed attempt `attempt` (1-based): initial * 2^(attempt-1), capped."""
    if attempt < 1:
        return 0.0
    exponent = min(attempt - 1, 62)
    return min(maximum, initial * (2.0**exponent))


def full_jitter(
    attempt: int,
    initial: float,
    maximum: float,
    *,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt: uniform in [0, ceiling), but never before `retry_after`.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads
    retries of many deliveries that failed together; a server's `Retry-After` is
    a floor, since retrying earlier is what it asked us not to do.
    """
    delay = rng() * ceiling(attempt, initial, maximum)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
