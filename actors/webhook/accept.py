"""Accepting one webhook event: its `webhook receive` span, the JSON checks, `ingest`, the answer.

Part of `actors.webhook.listener`, which calls `accept` once a request's route, verification and
body have passed; kept apart so that module stays readable.
"""

from __future__ import annotations

import logging
from typing import Protocol

import h11
import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from actors.webhook import answers
from actors.webhook.door import too_deep
from daemon.errors import StoreUnavailable
from daemon.telemetry import metrics
from daemon.telemetry import otel as telemetry

__all__ = ["Ingest", "IngestResult", "accept"]

log = logging.getLogger("ferry.webhook")
_decode = msgspec.json.Decoder().decode

IngestResult = tuple[str, bool]
"""What `Ingest` returns: (event id, whether the request was a duplicate of that event)."""


class Ingest(Protocol):
    """Store one event; return once it is committed (or found to be a duplicate).

    `replay` = (key, until), given only for a verified source: if the key was stored for the
    source and has not expired, nothing is stored and the answer is `("", True)`; otherwise the
    key is stored with the event, in the same transaction. `parent`: the request's span (given
    only while tracing it), whose context `traceparent` is, handed on as the object rather than
    parsed back from the string. Raises `StoreUnavailable` when the event was not committed.
    """

    async def __call__(
        self,
        source: str,
        body: bytes,
        dedup_key: str | None,
        traceparent: str | None,
        replay: tuple[str, float] | None = None,
        *,
        parent: Span | None = None,
    ) -> IngestResult: ...


async def accept(
    ingest: Ingest,
    max_depth: int,
    conn: h11.Connection,
    source: str,
    path: bytes,
    body: bytes,
    dedup_key: str | None,
    traceparent: str | None,
    replay: tuple[str, float] | None = None,
) -> bytes:
    """Ingest one event inside its `webhook receive` span (when tracing); the response to send.

    The event stores the server span's own context, so every later hop joins this trace.
    """
    tracer = telemetry.tracer()
    if tracer is None:
        return await _store(ingest, max_depth, conn, source, body, dedup_key, traceparent, None, replay)
    unsampled = telemetry.unsampled_traceparent(traceparent)
    if unsampled is not None:  # sampling left this trace out: no span work on any hop
        return await _store(ingest, max_depth, conn, source, body, dedup_key, unsampled, None, replay)
    span = tracer.start_span(
        "webhook receive",
        telemetry.parent_context(traceparent),
        SpanKind.SERVER,
        {"http.request.method": "POST", "url.path": path.decode("latin-1"), "ferry.source": source},
    )
    with trace.use_span(span, end_on_exit=True):
        own = telemetry.format_traceparent(span.get_span_context())
        return await _store(ingest, max_depth, conn, source, body, dedup_key, own, span, replay)


async def _store(
    ingest: Ingest,
    max_depth: int,
    conn: h11.Connection,
    source: str,
    body: bytes,
    dedup_key: str | None,
    traceparent: str | None,
    span: Span | None,
    replay: tuple[str, float] | None = None,
) -> bytes:
    """Validate and ingest one event; the response to send."""
    status, answer, headers = 202, b"", answers.NO_HEADERS
    event_id, reason = "", ""
    depth = max_depth
    if too_deep(body, depth):  # before the decoder, which recurses per level
        status, answer = 400, answers.error(f"JSON nested deeper than {depth} levels ([listener] max_depth)")
        reason = "too_deep"
    else:
        try:  # the cheapest check that covers syntax, UTF-8 and range (docs/architecture.md)
            _decode(body)
        except msgspec.ValidationError as exc:  # valid syntax; a number no stage could carry
            status, answer = 400, answers.error(f"JSON number out of range: {exc}")
            reason = "number_out_of_range"
        except msgspec.DecodeError as exc:
            status, answer = 400, answers.error(f"malformed JSON: {exc}")
    if status == 202:
        try:
            if replay is None and span is None:
                event_id, duplicate = await ingest(source, body, dedup_key, traceparent)
            else:
                event_id, duplicate = await ingest(source, body, dedup_key, traceparent, replay, parent=span)
        except StoreUnavailable:
            status, answer = 503, answers.error("store unavailable, event not accepted; retry")
            headers = answers.RETRY_STORE
        except Exception:
            log.exception("webhook ingest failed for source %s", source)
            status, answer = 500, answers.error("internal error, event not accepted")
        else:
            if duplicate and not event_id:
                status, answer = 401, answers.unauthorized(answers.REPLAYED)
                answers.rejected(source, answers.REPLAYED.reason)
            elif duplicate:
                status, answer = 200, answers.encode({"id": event_id, "duplicate": True})
            else:
                status, answer = 202, answers.encode({"id": event_id})
                metrics.current().received[source] += 1
    if status >= 400 and status != 401:
        answers.rejected(source, reason or answers.REJECTION_REASONS[status])
    if span is not None:
        span.set_attribute("http.response.status_code", status)
        if event_id:
            span.set_attribute("ferry.event_id", event_id)
        if status >= 500:
            span.set_status(StatusCode.ERROR)
    return answers.json_response(conn, status, answer, headers)
