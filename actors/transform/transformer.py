"""The transformer: one jq program applied to every event of its inputs.

Delivery:
    Exactly once per event. The transformer reads committed events after its
    cursor, and stores their outputs, their deliveries and its new cursor in
    one transaction. A crash before that commit re-runs the same events and
    derives the same output ids, so nothing is lost, doubled or re-keyed.

Bad input:
    An event that breaks the transform's `schema` (every violation listed) or on
    which jq fails dead-letters that event (stage = this transform, error = the
    violations or jq's message) and the rest of the batch goes on; the actor never
    stops for it. Events for which `filter` is false, or for which `map`
    emits nothing, are counted in `dropped`; outputs no route sends anywhere in
    `unrouted` (they are stored, for transforms reading this one, without deliveries).

Programs:
    `actors.transform.program.TransformProgram` (validation, jq, routes), shared with `ferry test`.

Enrichment:
    With an `Enricher` (`enrich`), each batch is first looked up and merged (see
    `actors.transform.enricher`); the batch commits once every lookup has an answer or has given up,
    and the events whose lookup failed are dead-lettered with the reason.

Tracing:
    One `transformer map` span per batch read. A batch of one event is a child of that
    event's stored trace context; a larger batch starts its own trace and links every
    event's context (one span per batch, not per event: the per-event cost stays one
    link). Outputs keep their parent's stored context, so their deliveries join the
    parent's trace.

Backpressure:
    Reads at most `batch_size` events at a time and waits for each commit
    before reading more; an idle transformer sleeps until the store signals a
    commit on one of its inputs.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, final

import trio
from opentelemetry import trace

from actors.transform.enricher import Enricher
from actors.transform.program import Failure, TransformProgram
from daemon.config.root import TransformConfig
from daemon.store.outbox import Derived, StoredEvent, commit_transform, cursor, read_events
from daemon.store.sqlite import Store
from daemon.telemetry import masking, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import TAPS, Record

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

log = logging.getLogger("ferry.transformer")


def batch_trace(events: list[StoredEvent]) -> tuple[Context | None, list[Link]]:
    """(parent, links) of a batch's span: the one event's context, or links to each event's."""
    if len(events) == 1:
        return telemetry.parent_context(events[0].trace), []
    links = [telemetry.link_to(event.trace) for event in events]
    return None, [link for link in links if link is not None]


@final
class Transformer:
    """Applies one transform's jq program; see the module docstring for its guarantees."""

    def __init__(
        self,
        name: str,
        config: TransformConfig,
        store: Store,
        *,
        sinks: list[str],
        transforms: list[str],
        batch_size: int = 1000,
        enricher: Enricher | None = None,
    ) -> None:
        self.name = name
        self._enricher = enricher
        self._inputs = list(config.inputs)
        self._store = store
        self._sinks = sinks
        self._wake = [*sinks, *transforms]
        self._batch_size = batch_size
        self._program = TransformProgram(config)
        self._signal = store.signal(name)
        self.transformed = 0
        self.dropped = 0
        self.unrouted = 0
        self.failed = 0

    def __repr__(self) -> str:
        counts = f"in: {self.transformed}, dropped: {self.dropped}, dead: {self.failed}"
        if self.unrouted:
            counts += f", unrouted: {self.unrouted}"
        return f"<Transformer {self.name} [{counts}]>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            if self._enricher is not None:
                await self._enricher.aclose()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        position = await self._store.call_until_committed(partial(cursor, name=self.name))
        task_status.started()
        while True:
            events = await self._store.call_until_committed(
                partial(read_events, streams=self._inputs, after=position, limit=self._batch_size)
            )
            if not events:
                await self._signal.wait()
                continue
            position = events[-1].seq
            tracer = telemetry.tracer()
            if tracer is None or not telemetry.any_sampled(event.trace for event in events):
                await self._map(events, position)
                continue
            parent, links = batch_trace(events)
            span = tracer.start_span(
                "transformer map", parent, attributes={"ferry.transform": self.name}, links=links
            )
            with trace.use_span(span, end_on_exit=True):
                await self._map(events, position)

    async def _map(self, events: list[StoredEvent], position: int) -> None:
        """Transform one batch and commit its outputs, deliveries, dead letters and cursor."""
        looked_up: list[tuple[StoredEvent, str]] = []
        if self._enricher is not None:
            events, looked_up = await self._enricher.enrich(events)
            looked_up = [(event, dead_letter(self.name, event, Failure(why))) for event, why in looked_up]
            self.failed += len(looked_up)
        outputs, failures = self._transform(events)
        failures = looked_up + failures
        await self._store.call_until_committed(
            partial(
                commit_transform,
                name=self.name,
                position=position,
                outputs=outputs,
                failures=failures,
                sinks=self._sinks,
            ),
            wake=self._wake,
        )
        if failures:
            metrics.current().dead_letters.add(len(failures), {"stage": self.name})
        if self.name in TAPS.taps:
            self._tap(outputs, failures)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {"ferry.events": len(events), "ferry.outputs": len(outputs), "ferry.failed": len(failures)}
            )

    def _tap(self, outputs: list[Derived], failures: list[tuple[StoredEvent, str]]) -> None:
        """Hand committed outputs (and jq's dead letters) to the taps on this transform."""
        name, now = self.name, time.time()
        for parent, nth, payload, _ in outputs:
            event_id = f"{parent.id}.{name}" if nth == 0 else f"{parent.id}.{name}.{nth}"
            TAPS.publish(name, Record("transform", event_id, payload, now, {"parent": parent.id}))
        for event, error in failures:
            extra = {"parent": event.id, "outcome": "dead", "error": error}
            TAPS.publish(name, Record("transform", f"{event.id}.{name}", event.payload, now, extra))

    def _transform(self, events: list[StoredEvent]) -> tuple[list[Derived], list[tuple[StoredEvent, str]]]:
        failures: list[tuple[StoredEvent, str]] = []
        outputs: list[Derived] = []
        for event, result in zip(events, self._program.map([e.payload for e in events]), strict=True):
            if isinstance(result, Failure):
                failures.append((event, dead_letter(self.name, event, result)))
                continue
            if not result:
                self.dropped += 1
            for nth, (payload, sinks) in enumerate(result):
                if sinks is not None and not sinks:
                    self.unrouted += 1
                outputs.append(Derived(event, nth, payload, sinks))
        self.transformed += len(events)
        self.failed += len(failures)
        return outputs, failures


def dead_letter(transform: str, event: StoredEvent, failure: Failure) -> str:
    """Log an event a transform dead-letters; its error text, with masked values and secrets hidden.

    A jq message may quote the event (`error(.)`), and a schema violation quotes the value.
    """
    redactor = masking.current()
    message = failure.message
    if redactor.rules or redactor.secrets:
        message = redactor.scrub(message, masking.decode_payload(event.payload)) or message
    log.warning(
        "event dead-lettered by transform",
        extra={"fields": {"transform": transform, "event_id": event.id, "error": message}},
    )
    return message
