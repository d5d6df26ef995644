"""Confirmation logging: one structured line when deliveries reach their final outcome.

Shape:
    A request that carried one delivery logs one line per final outcome: `delivered` (info) or
    `delivery dead-lettered` (error), with `delivery_id`, `event_id`, `status`, `attempts`,
    `latency_ms` (the attempt's request time), `age_ms` (since the delivery was created) and the
    receiver's `response` excerpt or the `error`. A batch request finalises many deliveries with
    one answer: it logs one line per outcome and status, with `deliveries` (how many),
    `delivery_ids` and `event_ids` (at most `IDS_PER_LINE` each; a larger batch takes several
    lines), `attempts_max` and `age_ms_max`. Either way every finalised delivery id appears in
    exactly one line, so `grep ID` finds its fate.

    Deliveries whose outcomes commit together (`actors.sink.commit`: attempts that finished
    while the previous group was being committed) share lines the same way, one line per
    outcome, status and answer: a group of one delivery logs the single-delivery line; a
    larger one the batch line, whose `latency_ms` is then the longest of its attempts'.

Cost:
    A line costs ~15 us of CPU (the JSON formatter, masking included). One line per delivery
    would cost a batching sink more than the delivery itself, hence one line per batch outcome;
    `[telemetry] log_outcomes = "dead"` raises `ferry.sink.outcome` to errors, leaving only the
    dead letters. Retries are not final outcomes: their warnings are summarised per interval
    (`actors.sink.retry_log`).

Masking: `response` and `error` are scrubbed by the sink before they get here; the formatter
applies `[telemetry] mask` to every field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from daemon.store.outbox import Due, Outcomes

outcome_log = logging.getLogger("ferry.sink.outcome")
IDS_PER_LINE: Final = 100


def log_final_outcomes(
    sink: str, batch: Sequence[Due], outcomes: Outcomes, latency: float, response: str | None
) -> None:
    """Log the deliveries of one attempt that reached their final outcome; see the module docstring."""
    log_committed(sink, [(batch, outcomes, latency, response)])


Attempt = tuple[Sequence[Due], Outcomes, float, "str | None"]
"""(batch, outcomes, latency in seconds, the receiver's answer) of one attempt."""


def log_committed(sink: str, attempts: Sequence[Attempt]) -> None:
    """Log the final outcomes of attempts whose outcomes committed together (module docstring)."""
    info = outcome_log.isEnabledFor(logging.INFO)
    if not any(outcomes.dead or (outcomes.delivered and info) for _, outcomes, _, _ in attempts):
        return
    now = time.time()
    groups: dict[tuple[str, int | None, str | None], list[tuple[Due, float, bool]]] = {}
    for batch, outcomes, latency, response in attempts:
        rows = {due.rowid: due for due in batch}
        alone = len(batch) == 1
        if info:
            for rowid, status in outcomes.delivered:
                groups.setdefault(("delivered", status, response), []).append((rows[rowid], latency, alone))
        for rowid, status, error in outcomes.dead:
            groups.setdefault(("dead", status, error), []).append((rows[rowid], latency, alone))
    for (outcome, status, text), members in groups.items():
        delivered = outcome == "delivered"
        extra = {"response": text} if delivered else {"error": text}
        if delivered and text is None:
            extra = {}
        for start in range(0, len(members), IDS_PER_LINE):
            chunk = members[start : start + IDS_PER_LINE]
            latency = max(latency for _, latency, _ in chunk)
            fields = (
                {"sink": sink, "latency_ms": round(latency * 1000, 1), "status": status}
                | extra
                | _ids([due for due, _, _ in chunk], now, single=len(chunk) == 1 and chunk[0][2])
            )
            if delivered:
                outcome_log.info("delivered", extra={"fields": fields})
            else:
                outcome_log.error("delivery dead-lettered", extra={"fields": fields})


def _ids(dues: Sequence[Due], now: float, *, single: bool) -> dict[str, Any]:
    if single:
        (due,) = dues
        return {
            "delivery_id": due.id,
            "event_id": due.event_id,
            "attempts": due.attempts + 1,
            "age_ms": round((now - due.created_at) * 1000, 1),
        }
    return {
        "deliveries": len(dues),
        "delivery_ids": [due.id for due in dues],
        "event_ids": [due.event_id for due in dues],
        "attempts_max": max(due.attempts for due in dues) + 1,
        "age_ms_max": round((now - min(due.created_at for due in dues)) * 1000, 1),
    }
