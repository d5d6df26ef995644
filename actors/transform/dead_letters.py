"""A transform's dead letters, as one named event (STYLE.md 10).

`error_text` is what a dead letter stores: jq's (or the schema's, or a lookup's) message with
masked values and secrets hidden — a jq message may quote the event (`error(.)`), and a schema
violation quotes the value. `dead_lettered` is the event itself, called once the dead letters
are committed (never for a commit that failed): one `event dead-lettered by transform` warning
per event on `ferry.transformer`, `ferry.dead_letters{stage}` counted, and a `dead_letter` event
on the span current in this task (the batch's `transformer map` or `aggregator join`), if one
records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry import trace

from actors.transform.program import Failure
from daemon.store.outbox import StoredEvent
from daemon.telemetry import masking, metrics

log = logging.getLogger("ferry.transformer")


def error_text(event: StoredEvent, failure: Failure, redactor: masking.Redactor) -> str:
    """The error a dead letter of `event` stores: `failure`'s message, masked values and secrets hidden."""
    message = failure.message
    if redactor.rules or redactor.secrets:
        message = redactor.scrub(message, masking.decode_payload(event.payload)) or message
    return message


def dead_lettered(transform: str, letters: Sequence[tuple[str, str]]) -> None:
    """`letters` (event id, error) were committed as dead letters of `transform`: log, count, trace."""
    if not letters:
        return
    for event_id, error in letters:
        log.warning(
            "event dead-lettered by transform",
            extra={"fields": {"transform": transform, "event_id": event_id, "error": error}},
        )
    metrics.current().dead_letters.add(len(letters), {"stage": transform})
    span = trace.get_current_span()
    if span.is_recording():
        for event_id, error in letters:
            span.add_event("dead_letter", {"ferry.event_id": event_id, "ferry.error": error})
