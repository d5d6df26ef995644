"""Retry schedules: exponential ceilings, full jitter below them, `Retry-After` as a floor."""

from __future__ import annotations

import pytest

from daemon.http.client import parse_retry_after
from daemon.limits.backoff import MAX_RETRY_AFTER, MAX_WAIT, ceiling, full_jitter, retry_at


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (0, 0.0),
        (-3, 0.0),
        (1, 0.5),
        (2, 1.0),
        (3, 2.0),
        (10, 256.0),
        (11, 300.0),
        (1_000, 300.0),
        (10**9, 300.0),
    ],
)
def test_ceiling_doubles_per_attempt_up_to_the_maximum(attempt: int, expected: float) -> None:
    assert ceiling(attempt, 0.5, 300.0) == expected


@pytest.mark.parametrize(
    ("attempt", "draw", "retry_after", "expected"),
    [
        (1, 0.0, None, 0.0),
        (1, 0.5, None, 0.25),
        (3, 0.5, None, 1.0),
        (3, 0.999, None, 0.999 * 2.0),
        (20, 0.5, None, 150.0),
        # Retry-After is a floor: it wins when the jittered delay is shorter ...
        (1, 0.5, 10.0, 10.0),
        (3, 0.0, 0.1, 0.1),
        # ... and does not shorten a longer one.
        (20, 0.5, 10.0, 150.0),
        (0, 0.9, None, 0.0),
    ],
)
def test_full_jitter_draws_below_the_ceiling_and_never_before_retry_after(
    attempt: int, draw: float, retry_after: float | None, expected: float
) -> None:
    delay = full_jitter(attempt, 0.5, 300.0, retry_after=retry_after, rng=lambda: draw)
    assert delay == pytest.approx(expected)


def test_full_jitter_stays_in_range_with_the_default_rng() -> None:
    delays = [full_jitter(4, 0.5, 300.0) for _ in range(200)]
    assert all(0.0 <= delay < 4.0 for delay in delays)


@pytest.mark.parametrize(
    ("retry_after", "maximum", "expected"),
    [
        (1e12, 300.0, MAX_RETRY_AFTER),  # Retry-After: 1000000000000
        (parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", 1.8e9), 300.0, MAX_RETRY_AFTER),
        (3599.0, 300.0, 3599.0),
        (None, 1e15, MAX_WAIT),  # max_backoff beyond the hard cap
        (1e12, 1e15, MAX_WAIT),
    ],
)
def test_full_jitter_caps_retry_after_and_every_wait(
    retry_after: float | None, maximum: float, expected: float
) -> None:
    delay = full_jitter(60, 1.0, maximum, retry_after=retry_after, rng=lambda: 0.999999999)
    assert delay == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("wait", "retry_after", "deadline", "expected"),
    [
        (10.0, None, 1_000.0, 110.0),
        (10.0, 5.0, 1_000.0, 110.0),
        (2_000.0, None, 1_000.0, 1_000.0),  # own backoff past the deadline: cut to it
        (2_000.0, 2_000.0, 1_000.0, None),  # the server's Retry-After past the deadline: dead now
        (3_600.0, 1e12, 10_000.0, 3_700.0),  # capped at an hour, which fits
        (3_600.0, 1e12, 3_000.0, None),  # capped at an hour, which does not fit
        (900.0, 900.0, 1_000.0, 1_000.0),  # ends exactly at the deadline
    ],
)
def test_retry_at_never_schedules_past_the_deadline(
    wait: float, retry_after: float | None, deadline: float, expected: float | None
) -> None:
    assert retry_at(100.0, wait, retry_after, deadline) == expected
