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

Cost:
    A line costs ~15 us of CPU (the JSON formatter, masking included). One line per delivery
    would cost a batching sink more than the delivery itself, hence one line per batch outcome;
    `[telemetry] log_outcomes = "dead"` raises `ferry.sink.outcome` to errors, leaving only the
    dead letters. Retries are not final outcomes: the sink logs one warning per failed attempt.

Masking: `response` and `error` are scrubbed by the sink before they get here; the formatter
applies `[telemetry] mask` to every field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from daemon.outbox import Due, Outcomes

outcome_log = logging.getLogger("ferry.sink.outcome")
IDS_PER_LINE: Final = 100


def log_final_outcomes(
    sink: str, batch: Sequence[Due], outcomes: Outcomes, latency: float, response: str | None
) -> None:
    """Log the deliveries of one attempt that reached their final outcome; see the module docstring."""
    info = outcome_log.isEnabledFor(logging.INFO)
    if not (outcomes.dead or (outcomes.delivered and info)):
        return
    rows = {due.rowid: due for due in batch}
    now = time.time()
    common: dict[str, Any] = {"sink": sink, "latency_ms": round(latency * 1000, 1)}
    groups: dict[tuple[str, int | None, str | None], list[Due]] = {}
    if info:
        for rowid, status in outcomes.delivered:
            groups.setdefault(("delivered", status, response), []).append(rows[rowid])
    for rowid, status, error in outcomes.dead:
        groups.setdefault(("dead", status, error), []).append(rows[rowid])
    for (outcome, status, text), dues in groups.items():
        delivered = outcome == "delivered"
        extra = {"response": text} if delivered else {"error": text}
        if delivered and text is None:
            extra = {}
        for start in range(0, len(dues), IDS_PER_LINE):
            chunk = dues[start : start + IDS_PER_LINE]
            fields = common | {"status": status} | extra | _ids(chunk, now, single=len(batch) == 1)
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
