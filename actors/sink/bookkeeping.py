"""What an attempt of a sink leaves behind besides its stored outcomes: error texts and answers
without masked values or secrets, tap records, counters, and its span's parent and attributes.

Pure bookkeeping, called by `actors.sink.sink.Sink` (no store, no I/O but the telemetry it feeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry.trace import Link

from actors.sink.commit import Finished
from actors.sink.outcomes import IDS_PER_LINE, outcome_log
from daemon import poison
from daemon.errors import DeliveryError
from daemon.store.ordering import Fetched
from daemon.store.outbox import Due, Outcomes
from daemon.telemetry import masking, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.masking import Redactor
from daemon.telemetry.tap import Record, Taps

if TYPE_CHECKING:
    from opentelemetry.context import Context


def guarded_error(error: DeliveryError, batch: Sequence[Due], redactor: Redactor) -> DeliveryError:
    """`scrubbed(error, batch)`; a message that cannot be scrubbed is hidden, never a crash."""
    try:
        return scrubbed(error, batch, redactor)
    except Exception as exc:
        if not poison.isolable(exc):
            raise
        hidden = f"(error hidden: could not be masked: {type(exc).__name__})"
        return type(error)(hidden, status=error.status, retry_after=error.retry_after)


def guarded_text(text: str, batch: Sequence[Due], redactor: Redactor) -> str:
    """`scrubbed_text(text, batch)`; text that cannot be scrubbed is hidden, never a crash."""
    try:
        return scrubbed_text(text, batch, redactor)
    except Exception as exc:
        if not poison.isolable(exc):
            raise
        return f"(hidden: could not be masked: {type(exc).__name__})"


def scrubbed_text(text: str, batch: Sequence[Due], redactor: Redactor) -> str:
    """`text` (a receiver's answer) without the batch payloads' masked values or any secret."""
    if not (redactor.rules or redactor.secrets):
        return text
    payloads = [masking.decode_payload(due.payload) for due in batch] if redactor.rules else None
    return redactor.scrub(text, payloads) or text


def scrubbed(error: DeliveryError, batch: Sequence[Due], redactor: Redactor) -> DeliveryError:
    """`error` with the masked values of the batch's payloads and the secrets hidden in its message.

    The message becomes the delivery's `last_error` and a log field; a receiver's answer may
    quote the payload (or a header) it refused.
    """
    if not (redactor.rules or redactor.secrets):
        return error
    payloads = [masking.decode_payload(due.payload) for due in batch] if redactor.rules else None
    message = str(error)
    scrubbed = redactor.scrub(message, payloads) or message
    if scrubbed == message:
        return error
    return type(error)(scrubbed, status=error.status, retry_after=error.retry_after)


def tap(taps: Taps, sink: str, batch: Sequence[Due], outcomes: Outcomes, now: float) -> None:
    """Hand an attempt's committed outcomes to the taps on `sink`, one record per delivery."""
    results: dict[int, tuple[str, int | None, str | None]] = {}
    for rowid, code in outcomes.delivered:
        results[rowid] = ("delivered", code, None)
    for rowid, code, message in outcomes.dead:
        results[rowid] = ("dead", code, message)
    for rowid, _, code, message in outcomes.retry:
        results[rowid] = ("retry", code, message)
    for due in batch:
        outcome, status, error = results.get(due.rowid, ("unknown", None, None))
        extra = {
            "delivery_id": due.id,
            "attempt": due.attempts + 1,
            "outcome": outcome,
            "status": status,
            "error": error,
        }
        taps.publish(sink, Record("sink", due.event_id, due.payload, now, extra))


def outcome_of(outcomes: Outcomes) -> str:
    """`ferry.outcome` of an attempt: delivered, retry, dead, or mixed (a batch split by its limits)."""
    kinds = [name for name, size in sizes(outcomes) if size]
    return kinds[0] if len(kinds) == 1 else "mixed"


def sizes(outcomes: Outcomes) -> tuple[tuple[str, int], ...]:
    return (
        ("delivered", len(outcomes.delivered)),
        ("retry", len(outcomes.retry)),
        ("dead", len(outcomes.dead)),
    )


LATENCY_SAMPLES_PER_BATCH = 16


def count(
    sink: str, entries: Sequence[Finished], delivered: int, retried: int, dead: int, now: float
) -> None:
    """Count committed attempts' outcomes, the dead letters and each delivered row's latency."""
    meter = metrics.current()
    for name, size in (("delivered", delivered), ("retry", retried), ("dead", dead)):
        if size:
            meter.deliveries.add(size, {"sink": sink, "outcome": name})
    if dead:
        meter.dead_letters.add(dead, {"stage": sink})
    if delivered:
        attributes = {"sink": sink}
        for entry in entries:
            if not entry.outcomes.delivered:
                continue
            if len(entry.batch) == 1:
                meter.delivery_latency.record(max(0.0, now - entry.batch[0].created_at), attributes)
                continue
            rowids = {rowid for rowid, _ in entry.outcomes.delivered}
            rows = [due for due in entry.batch if due.rowid in rowids]
            # A histogram record costs ~4 us: a batch contributes an even sample of at most 16 rows
            # (a ceiling step: a floor one recorded up to 31 of a 31-row batch).
            for due in rows[:: -(-len(rows) // LATENCY_SAMPLES_PER_BATCH)]:
                meter.delivery_latency.record(max(0.0, now - due.created_at), attributes)


def batch_trace(batch: Sequence[Due]) -> tuple[Context | None, list[Link]]:
    """(parent, links) of an attempt's span: the one event's context, or links to each event's."""
    if len(batch) == 1:
        return telemetry.parent_context(batch[0].trace), []
    links = [telemetry.link_to(due.trace) for due in batch]
    return None, [link for link in links if link is not None]


def span_attributes(sink: str, batch: Sequence[Due]) -> dict[str, str | int]:
    first = batch[0]
    if len(batch) == 1:
        return {
            "ferry.sink": sink,
            "ferry.event_id": first.event_id,
            "ferry.delivery_id": first.id,
            "ferry.attempt": first.attempts + 1,
        }
    return {"ferry.sink": sink, "ferry.batch.size": len(batch), "ferry.attempt": first.attempts + 1}


def settled_in_fetch(sink: str, fetched: Fetched) -> None:
    """Count and log what an ordered fetch dropped as stale or dead-lettered as unkeyable.

    Final outcomes, so they go to `ferry.sink.outcome` like the others: every id in a line.
    """
    meter = metrics.current()
    if fetched.stale:
        meter.deliveries.add(fetched.stale, {"sink": sink, "outcome": "stale"})
        for start in range(0, fetched.stale, IDS_PER_LINE):
            ids = fetched.stale_ids[start : start + IDS_PER_LINE]
            outcome_log.info(
                "deliveries dropped as stale",
                extra={"fields": {"sink": sink, "deliveries": len(ids), "delivery_ids": ids}},
            )
    if fetched.dead:
        meter.deliveries.add(fetched.dead, {"sink": sink, "outcome": "dead"})
        meter.dead_letters.add(fetched.dead, {"stage": sink})
        for delivery_id, reason in fetched.dead_letters:
            outcome_log.error(
                "delivery dead-lettered",
                extra={"fields": {"sink": sink, "delivery_id": delivery_id, "error": reason}},
            )
