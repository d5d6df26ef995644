"""Retry schedules: exponential ceilings, full jitter below them, `Retry-After` as a floor."""

from __future__ import annotations

import pytest

from daemon.limits.backoff import ceiling, full_jitter


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
