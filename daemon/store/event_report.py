"""`ferry ctl event ID`'s report from the rows either backend reads (`daemon.store.confirmations`,
`daemon.store.postgres.confirmations`): backend-neutral, no SQL but the column list both select.

Each backend runs its own statements (placeholders, collation and the delivery lookup differ) and
hands the rows here: the bisection of `seq` by receipt time, and the report assembled from events,
their deliveries and the windows holding their outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from daemon.store.types import (
    _ROOT_ID,
    _STATES,
    CLOCK_SLACK,
    PENDING,
    DeliveryOutcome,
    EventOutcome,
    EventReport,
    WindowWait,
)

DELIVERY_COLUMNS: Final = (
    "event_seq, id, stage, state, attempts, created_at, finished_at, next_attempt_at, "
    "last_status, last_latency, last_response, last_error"
)
"""What `report` reads of each delivery (in this order)."""

Row = Sequence[Any]


def lookup_start(event_id: str) -> float | None:
    """The receipt time from which on `event_id`'s events are searched (its time, less
    `CLOCK_SLACK`), or None when the id carries no time (then every event is searched)."""
    match = _ROOT_ID.match(event_id)
    return int(match.group(1), 16) / 1000 - CLOCK_SLACK if match else None


def bisect_seq(low: int, high: int, since: float, probe: Callable[[int], Row | None]) -> int:
    """The seq in `[low, high]` from which on every event was received at `since` or later;
    `probe(seq)` is the first event (seq, received_at) at or after `seq`, or None."""
    while low < high:
        middle = (low + high) // 2
        found = probe(middle)
        if found is None or found[1] >= since:
            high = middle
        else:
            low = int(found[0]) + 1
    return low


def window_waits(rows: Iterable[Row]) -> list[WindowWait]:
    """Rows of (event id, transform, key, opened_at, size) as the report's windows."""
    return [
        WindowWait(id=id_, transform=transform, key=decoded(key), opened_at=opened, size=size)
        for id_, transform, key, opened, size in rows
    ]


def report(
    events: Sequence[Row], deliveries: Iterable[Row], windows: list[WindowWait], text: Callable[[Any], str]
) -> EventReport:
    """The report of `events` (seq, id, stream, payload, received_at) with their `deliveries`
    (`DELIVERY_COLUMNS`, in rowid order); `text(payload)` is a payload as (opened) text."""
    by_seq: dict[int, list[DeliveryOutcome]] = {row[0]: [] for row in events}
    for (
        seq,
        id_,
        stage,
        state,
        attempts,
        created,
        finished,
        due,
        status,
        latency,
        response,
        error,
    ) in deliveries:
        by_seq[seq].append(
            DeliveryOutcome(
                id=id_,
                stage=stage,
                state=_STATES.get(state, str(state)),
                attempts=attempts,
                created_at=created,
                finished_at=finished,
                next_attempt_at=due if state == PENDING else None,
                status=status,
                latency_s=latency,
                response=response,
                error=error,
            )
        )
    outcomes = [
        EventOutcome(
            id=id_,
            stream=stream,
            received_at=received,
            payload=decoded(text(payload)),
            deliveries=by_seq[seq],
        )
        for seq, id_, stream, payload, received in events
    ]
    return EventReport(events=outcomes, windows=windows)


def decoded(text: str | None) -> Any:
    """JSON text as its value; text that is not JSON as itself."""
    if text is None:
        return None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


__all__ = ["DELIVERY_COLUMNS", "bisect_seq", "decoded", "lookup_start", "report", "window_waits"]
