"""Retry schedules as pure functions: exponential backoff with full jitter, within hard caps.

Caps (so that no answer and no config can park a retry for ever):
    A server's `Retry-After` is honoured as a floor up to `MAX_RETRY_AFTER` (one hour, the same
    bound the rate limiter puts on a pause); a larger value (`Retry-After: 1000000000000`, an
    HTTP date in year 9999) counts as one hour. No computed wait exceeds `MAX_WAIT` (a week),
    whatever `max_backoff` says. A delivery is never scheduled past its `max_age` deadline:
    see `retry_at`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

MAX_RETRY_AFTER: Final = 3600.0
"""Longest `Retry-After` honoured, in seconds; a longer one is read as this."""
MAX_WAIT: Final = 7 * 86400.0
"""Longest wait before any next attempt, in seconds, whatever the config."""


def ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The backoff ceiling after failed attempt `attempt` (1-based): initial * 2^(attempt-1), capped."""
    if attempt < 1:
        return 0.0
    exponent = min(attempt - 1, 62)
    return min(maximum, initial * (2.0**exponent))


def capped_retry_after(retry_after: float | None) -> float | None:
    """A server's `Retry-After` (seconds) as ferry honours it: at most `MAX_RETRY_AFTER`."""
    return None if retry_after is None else min(max(retry_after, 0.0), MAX_RETRY_AFTER)


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
    a floor, since retrying earlier is what it asked us not to do — up to
    `MAX_RETRY_AFTER`. The result is at most `MAX_WAIT`.
    """
    delay = rng() * ceiling(attempt, initial, maximum)
    floor = capped_retry_after(retry_after)
    if floor is not None:
        delay = max(delay, floor)
    return min(delay, MAX_WAIT)


def retry_at(now: float, wait: float, retry_after: float | None, deadline: float) -> float | None:
    """When to try again, `wait` seconds from `now`, but never after `deadline` (the max_age).

    A wait of ferry's own backoff that would end after the deadline is shortened to it: one
    last attempt at the deadline, dead-lettered if it fails. None when the server's
    `Retry-After` (as honoured: `capped_retry_after`) itself ends after the deadline: the
    receiver refuses the delivery until after its last allowed attempt, so it ends dead now.
    """
    floor = capped_retry_after(retry_after)
    if floor is not None and now + floor > deadline:
        return None
    return min(now + wait, deadline)


def past_max_age(retry_after: float | None, max_age: float, error: object) -> str:
    """The dead-letter reason when `retry_at` found the server's `Retry-After` past the deadline."""
    return f"gave up: Retry-After {retry_after or 0:g}s ends after max_age {max_age:g}s: {error}"
