"""Trace context helpers, the JSON log format with trace ids, and bounded span export."""

from __future__ import annotations

import json
import logging
import random
import re
import time

import pytest
import trio
import trio.lowlevel
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from daemon.config.sections import TelemetryConfig
from daemon.config.units import Duration
from daemon.telemetry import logs, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.logs import JsonFormatter
from daemon.telemetry.otel import Telemetry, format_traceparent, parse_traceparent
from tests.fakes import free_port
from tests.otlp import OtlpReceiver

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has four fields
        "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",  # not hex
    ],
)
def test_invalid_traceparents_start_a_new_trace(value: str | None) -> None:
    assert parse_traceparent(value) is None
    assert telemetry.parent_context(value) is None


def test_a_traceparent_round_trips() -> None:
    context = parse_traceparent(VALID)
    assert context is not None
    assert context.is_remote
    assert context.trace_flags.sampled
    assert format_traceparent(context) == VALID
    unsampled = parse_traceparent(VALID[:-2] + "00")
    assert unsampled is not None
    assert format_traceparent(unsampled) == VALID[:-2] + "00"


def test_a_later_version_is_read_by_its_version_00_prefix() -> None:
    context = parse_traceparent("01" + VALID[2:] + "-more")
    assert context is not None
    assert format_traceparent(context) == VALID


def _line(record_span: bool) -> dict[str, object]:
    record = logging.LogRecord("ferry.test", logging.INFO, __file__, 1, "hello", None, None)
    record.fields = {"k": 1}
    line: dict[str, object]
    if not record_span:
        line = json.loads(JsonFormatter().format(record))
        return line
    parent = telemetry.parent_context(VALID)
    with trace.use_span(trace.get_current_span(parent)):
        line = json.loads(JsonFormatter().format(record))
        return line


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids() -> None:
    line = _line(record_span=True)
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == "00f067aa0ba902b7"
    assert line["k"] == 1
    assert line["msg"] == "hello"
    assert "trace_id" not in _line(record_span=False)


def test_with_no_collector_spans_beyond_the_queue_are_dropped_and_counted() -> None:
    config = TelemetryConfig(
        traces=True,
        sample_ratio=1.0,
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        max_queue=16,
        export_timeout=Duration(0.5),
        metrics=False,
    )
    running = Telemetry.start(config)
    try:
        tracer = telemetry.tracer()
        assert tracer is not None
        for _ in range(2000):
            tracer.start_span("webhook receive").end()
        assert running.spans_dropped >= 2000 - 16 - 512  # at most a queue and one export batch kept
    finally:
        began = time.monotonic()
        running.shutdown()
    assert time.monotonic() - began < 2 * 0.5 + 1
    assert telemetry.tracer() is None
    assert not running.metrics.live


def test_with_traces_off_there_is_no_tracer() -> None:
    running = Telemetry.start(TelemetryConfig(traces=False, metrics=False))
    try:
        assert telemetry.tracer() is None
        assert telemetry.current_traceparent() is None
    finally:
        running.shutdown()


def test_unsampled_traceparent_is_parent_based_and_agrees_with_the_sdk() -> None:
    sampled_in = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    unsampled_in = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    running = Telemetry.start(TelemetryConfig(traces=True, metrics=False, sample_ratio=0.25))
    try:
        assert telemetry.unsampled_traceparent(sampled_in) is None
        left_out = telemetry.unsampled_traceparent(unsampled_in)
        assert left_out is not None
        assert left_out.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert left_out.endswith("-00")
        assert left_out[36:52] != "00f067aa0ba902b7"  # a span id of its own
        assert not telemetry.sampled(left_out)
        assert telemetry.sampled(sampled_in)
        random.seed(7)
        decisions = [telemetry.unsampled_traceparent(None) for _ in range(4000)]
        assert 0.22 < decisions.count(None) / 4000 < 0.28
        tracer = telemetry.tracer()
        assert tracer is not None
        for _ in range(200):  # when ferry samples a new trace, the SDK records that very trace
            if telemetry.unsampled_traceparent(None) is None:
                ids = telemetry._ids.get()
                assert ids is not None
                chosen = ids.chosen
                span = tracer.start_span("x")
                assert span.get_span_context().trace_id == chosen
                assert span.is_recording()
                span.end()
    finally:
        running.shutdown()


async def test_two_daemons_in_one_process_trace_and_count_apart() -> None:
    """Tracing and instruments belong to the context that started them and the tasks it starts,
    never to the process: a daemon without tracing next to one with it sees no tracer."""
    seen: dict[str, object] = {}

    async def daemon(name: str, traces: bool) -> None:
        instruments = metrics.install(metrics.Metrics())  # as `serve` does
        config = TelemetryConfig(traces=traces, metrics=False, prometheus=True)
        running = Telemetry.start(config, metrics=instruments)
        try:
            metrics.current().received[name] += 1
            await trio.lowlevel.checkpoint()  # the other one starts meanwhile
            seen[name] = (telemetry.tracer() is not None, dict(metrics.current().received))
        finally:
            running.shutdown()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon, "traced", True)
        nursery.start_soon(daemon, "quiet", False)
    assert seen == {"traced": (True, {"traced": 1}), "quiet": (False, {"quiet": 1})}
    assert telemetry.tracer() is None
    assert "traced" not in metrics.current().received


def test_links_and_batches_skip_traces_sampling_left_out() -> None:
    off = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    on = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert telemetry.link_to(off) is None
    assert telemetry.link_to(on) is not None
    assert not telemetry.any_sampled([off, None, "garbage"])
    assert telemetry.any_sampled([off, on])


def test_collector_warnings_are_logged_once_then_again_only_after_an_export_succeeded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup_logging("info")
    logs.sdk_log_filter.rearm()  # module state: start as a fresh daemon does
    port = free_port()
    down = f"http://127.0.0.1:{port}/v1/traces"  # nothing listens there
    failing = telemetry._CountingExporter(OTLPSpanExporter(endpoint=down, timeout=0.3))
    collector = OtlpReceiver().start()
    working = telemetry._CountingExporter(OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", timeout=2))
    tracer = TracerProvider().get_tracer("test")

    def export(exporter: SpanExporter) -> SpanExportResult:
        span = tracer.start_span("x")
        span.end()
        return exporter.export([span])  # type: ignore[list-item]

    def sdk_lines() -> list[str]:
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        # An exporter another test of this worker left retrying (e.g. to localhost:4318) logs here
        # too; only this test's exporters are under test.
        return [
            line["msg"]
            for line in lines
            if line["logger"].startswith("opentelemetry")
            and all(int(other) == port for other in re.findall(r"port=(\d+)", line["msg"]))
        ]

    try:
        assert [export(failing) for _ in range(3)] == [SpanExportResult.FAILURE] * 3
        first = sdk_lines()
        assert len(first) == len(set(first)) >= 1  # each kind of warning once, not once per export
        assert export(failing) is SpanExportResult.FAILURE
        assert sdk_lines() == []
        assert export(working) is SpanExportResult.SUCCESS  # the collector was back…
        assert export(failing) is SpanExportResult.FAILURE  # …and went away again: news again
        again = sdk_lines()
        assert again, first
        assert len(again) == len(set(again))
        assert set(again) <= set(first)
    finally:
        collector.stop()
        failing.shutdown()
        working.shutdown()
