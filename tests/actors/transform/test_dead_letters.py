"""A transform's dead letters are one named event: logged, counted and on the span, together."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.alerting.expr import flatten
from actors.transform.dead_letters import dead_lettered, error_text
from actors.transform.program import Failure
from daemon.store.outbox import StoredEvent
from daemon.telemetry import metrics
from daemon.telemetry.masking import Redactor


async def test_dead_letters_are_logged_counted_and_put_on_the_span(caplog: pytest.LogCaptureFixture) -> None:
    reader = InMemoryMetricReader()
    metrics.install(metrics.Metrics(MeterProvider(metric_readers=[reader]).get_meter("test")))
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with caplog.at_level(logging.WARNING, "ferry.transformer"):
        with trace.use_span(provider.get_tracer("test").start_span("transformer map"), end_on_exit=True):
            dead_lettered("enrich", [("e1", "jq: boom"), ("e2", "jq: bang")])
        dead_lettered("enrich", [])  # nothing committed: nothing said
    assert [(r.getMessage(), r.__dict__["fields"]["event_id"]) for r in caplog.records] == [
        ("event dead-lettered by transform", "e1"),
        ("event dead-lettered by transform", "e2"),
    ]
    counted = flatten(reader.get_metrics_data())["ferry.dead_letters"]
    assert counted == [({"stage": "enrich"}, 2.0)]
    [span] = spans.get_finished_spans()
    assert [(e.name, (e.attributes or {}).get("ferry.event_id")) for e in span.events] == [
        ("dead_letter", "e1"),
        ("dead_letter", "e2"),
    ]


def test_the_error_text_hides_masked_values_and_secrets() -> None:
    event = StoredEvent(1, "e1", "in", b'{"email": "ann@example.com"}', None)
    redactor = Redactor.build(["email"], ["s3cret"])
    text = error_text(event, Failure("ann@example.com is not a number (key s3cret)"), redactor)
    assert "ann@example.com" not in text
    assert "s3cret" not in text
    assert error_text(event, Failure("plain"), Redactor()) == "plain"
