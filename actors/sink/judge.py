"""How a sink judges one attempt: what the receiver answered (`Answer`) and what becomes of each
delivery in it (`judge`: delivered, retried when, or dead). Pure: no I/O, no clock reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from actors.sink.config import RetryConfig
from daemon.errors import DeliveryError, PermanentDelivery
from daemon.limits.backoff import full_jitter, past_max_age, retry_at
from daemon.store.outbox import Due, Outcomes


class Answer(NamedTuple):
    """What the receiver said to a successful attempt: its status and the start of its body.

    `items`: the items it refused all the same (by position in the batch; `batch.item_outcomes`),
    each judged alone with its own error; the others are delivered.
    """

    status: int | None
    excerpt: str | None = None
    items: Mapping[int, DeliveryError] | None = None


def next_attempt_wait(attempt: int, retry: RetryConfig, retry_after: float | None) -> float:
    """Seconds until the next try after failed attempt number `attempt`."""
    return full_jitter(attempt, retry.initial_backoff, retry.max_backoff, retry_after=retry_after)


def judge(
    batch: Sequence[Due],
    error: DeliveryError | None,
    status: int | None,
    retry: RetryConfig,
    now: float,
    *,
    hold: bool = False,
    items: Mapping[int, DeliveryError] | None = None,
) -> Outcomes:
    """Turn one attempt's result into outcomes for each delivery in it (pure: no I/O).

    No retry is scheduled after the delivery's `max_age` deadline (`daemon.limits.backoff.retry_at`).

    `hold`: a retryable failure is rescheduled whatever the attempt and age limits (a failed
    circuit-breaker probe: the service is down, which is no reason to give up on the delivery).
    `items`: errors of single items of an otherwise successful attempt (`Answer.items`, by
    position in `batch`): each item is judged alone, with its own error or with the attempt's.
    """
    if items:
        merged = Outcomes([], [], [])
        for index, due in enumerate(batch):
            one = judge([due], items.get(index, error), status, retry, now, hold=hold)
            merged.delivered.extend(one.delivered)
            merged.retry.extend(one.retry)
            merged.dead.extend(one.dead)
        return merged
    outcomes = Outcomes([], [], [])
    for due in batch:
        attempt = due.attempts + 1
        if error is None:
            outcomes.delivered.append((due.rowid, status))
        elif isinstance(error, PermanentDelivery):
            outcomes.dead.append((due.rowid, error.status, str(error)))
        elif hold:
            wait = next_attempt_wait(attempt, retry, error.retry_after)
            outcomes.retry.append((due.rowid, now + wait, error.status, str(error)))
        elif attempt >= retry.max_attempts:
            outcomes.dead.append((due.rowid, error.status, f"gave up after {attempt} attempts: {error}"))
        elif now - due.created_at >= retry.max_age:
            outcomes.dead.append((due.rowid, error.status, f"gave up after {retry.max_age:g}s: {error}"))
        else:
            wait = next_attempt_wait(attempt, retry, error.retry_after)
            at = retry_at(now, wait, error.retry_after, due.created_at + retry.max_age)
            if at is None:
                outcomes.dead.append(
                    (due.rowid, error.status, past_max_age(error.retry_after, retry.max_age, error))
                )
            else:
                outcomes.retry.append((due.rowid, at, error.status, str(error)))
    return outcomes
