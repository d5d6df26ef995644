"""Telemetry: OpenTelemetry traces and metrics over OTLP, W3C trace context, JSON logs.

Traces:
    One trace per event. The webhook listener's server span continues an incoming
    `traceparent`; that span's context, as a traceparent string, is stored with the event
    (`events.trace`), and every later hop (transform, each sink attempt, even after a restart
    hours later) starts its span from the stored string, never from an actor's contextvars.
    Spans are named `"{actor} {operation}"`. `tracer()` is None while tracing is off, so a
    hop's cost then is one `is None` test.

Export and memory:
    Spans and metrics leave through the SDK's own threads (OTLP http/protobuf with
    `requests`), so an export never blocks trio. Finished spans wait in a queue of at most
    `max_queue`; when it is full (no collector, a slow one) new spans are dropped and counted
    (`ferry.telemetry.spans_dropped`), so memory stays bounded. `Telemetry.shutdown()`
    flushes within `export_timeout` per signal and never waits longer.

Logs: `daemon.telemetry.logs`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, Final, final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags, Tracer
from prometheus_client import CollectorRegistry, generate_latest

from daemon.config.sections import TelemetryConfig
from daemon.telemetry import metrics as _metrics
from daemon.telemetry.logs import sdk_log_filter

__all__ = [
    "Telemetry",
    "any_sampled",
    "current_traceparent",
    "format_traceparent",
    "link_to",
    "parent_context",
    "parse_traceparent",
    "sampled",
    "tracer",
    "unrecorded_span",
    "unsampled_traceparent",
]

log = logging.getLogger("ferry.telemetry")
_MAX_LINKS: Final = 1024  # a transform batch (1,000 events) links every event
_ODD_HEX: Final = frozenset("13579bdfBDF")
_LOW_64: Final = (1 << 64) - 1


_tracer: ContextVar[Tracer | None] = ContextVar("ferry.tracer", default=None)
_ids: ContextVar[_ChosenIds | None] = ContextVar("ferry.trace_ids", default=None)
# The tracing of the daemon a task belongs to: `Telemetry.start` sets both in its caller's context
# (`serve`'s), which every task started from there inherits; nothing process-wide.

tracer: Final[Callable[[], Tracer | None]] = _tracer.get
"""The daemon's tracer, or None while tracing is off (the context variable's own `get`: the
cheapest call there is, as every hop asks)."""


# -- W3C trace context -------------------------------------------------------------------------


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span context of a W3C `traceparent` (version 00 layout), or None if invalid."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if (
        len(trace_hex) != 32
        or len(span_hex) != 16
        or len(flags_hex) != 2
        or (version == "00" and len(parts) != 4)
    ):
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def format_traceparent(context: SpanContext) -> str:
    """`context` as a W3C `traceparent` header value."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags) & 1:02x}"


def parent_context(traceparent: str | None) -> Context | None:
    """An OTel context whose parent span is `traceparent` (None: start a new trace)."""
    span_context = parse_traceparent(traceparent)
    if span_context is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def unrecorded_span(traceparent: str | None) -> NonRecordingSpan | None:
    """A span to make current for a hop sampling left out, so that `traceparent` still propagates.

    None when `traceparent` is invalid or sampled (a sampled hop starts a real span instead).
    """
    span_context = parse_traceparent(traceparent)
    if span_context is None or span_context.trace_flags.sampled:
        return None
    return NonRecordingSpan(span_context)


def link_to(traceparent: str | None) -> Link | None:
    """A span link to the span `traceparent` names, or None if it names none or is not sampled.

    A link to a span that was never recorded would lead nowhere.
    """
    if not sampled(traceparent):
        return None
    span_context = parse_traceparent(traceparent)
    return None if span_context is None else Link(span_context)


def sampled(traceparent: str | None) -> bool:
    """Whether a (stored) `traceparent` says its trace is recorded: its sampled flag is set.

    A string test, not a parse: hops call it per event to skip all span work for the traces
    sampling left out.
    """
    return traceparent is not None and len(traceparent) >= 55 and traceparent[-1] in _ODD_HEX


def any_sampled(traceparents: Iterable[str | None]) -> bool:
    """Whether any of a batch's traces is recorded (a batch span then links to those that are)."""
    return any(sampled(value) for value in traceparents)


def unsampled_traceparent(incoming: str | None) -> str | None:
    """Decide a new event's sampling before any span exists; None means: record its trace.

    Otherwise the result is the `traceparent` to store with the event instead of a span's:
    the incoming trace id (or a new one) with a new span id and the sampled flag clear, so
    every later hop sees at once that there is nothing to record. Parent-based like the SDK's
    sampler: an incoming `traceparent` decides for its own trace; a new trace is sampled when
    its id falls under `sample_ratio` by the SDK's own `TraceIdRatioBased` rule, and that id
    is handed to the SDK for the span it then starts, so both decisions agree.
    """
    span_context = parse_traceparent(incoming)
    if span_context is not None:
        if span_context.trace_flags.sampled:
            return None
        trace_id = span_context.trace_id
    else:
        trace_id = random.getrandbits(128) or 1
        ids = _ids.get()
        if ids is not None and trace_id & _LOW_64 < ids.bound:
            ids.chosen = trace_id
            return None
    return f"00-{trace_id:032x}-{random.getrandbits(64) or 1:016x}-00"


def current_traceparent() -> str | None:
    """The `traceparent` of the span current in this task, or None outside any span."""
    span_context = trace.get_current_span().get_span_context()
    return format_traceparent(span_context) if span_context.is_valid else None


# -- export ------------------------------------------------------------------------------------


@final
class _ChosenIds(RandomIdGenerator):
    """The SDK's id generator, except that the webhook may choose the next trace id.

    `unsampled_traceparent` draws a new trace's id to decide its sampling; the span started
    right after (synchronously, on the same thread) takes that id, so the SDK's ratio sampler
    reaches the same decision instead of sampling a second time.
    """

    def __init__(self) -> None:
        self.chosen = 0
        self.bound = 0  # trace ids whose low 64 bits are below this are sampled

    def generate_trace_id(self) -> int:
        chosen, self.chosen = self.chosen, 0
        return chosen or super().generate_trace_id()


@final
class _BoundedSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops instead of logging each one."""

    def __init__(self, exporter: SpanExporter, max_queue: int, export_timeout_s: float) -> None:
        super().__init__(
            exporter,
            max_queue_size=max_queue,
            max_export_batch_size=min(512, max_queue),
            export_timeout_millis=export_timeout_s * 1000,
        )
        self._max_queue = max_queue
        # The SDK keeps its queue private; its length is the only way to tell a drop before it is
        # logged (the SDK logs a warning per dropped span).
        self._queue: Sequence[object] = getattr(self._batch_processor, "_queue", ())
        self.dropped = 0

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        super().on_end(span)

    def shutdown_within(self, timeout_ms: int) -> None:
        """Export what is queued, giving up after `timeout_ms` (the public `shutdown` waits 30 s)."""
        inner = getattr(self._batch_processor, "shutdown", None)
        if inner is None:
            self.shutdown()  # type: ignore[no-untyped-call]
        else:
            inner(timeout_millis=timeout_ms)


@final
class _CountingExporter(SpanExporter):
    """Counts spans lost to failed exports (collector down or refusing) on top of the OTLP exporter."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.failed = 0
        self.reachable = False  # the last export succeeded (False until one has)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        self.reachable = result is SpanExportResult.SUCCESS
        if self.reachable:
            sdk_log_filter.rearm()
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


@final
class _RearmingMetricExporter(OTLPMetricExporter):
    """The OTLP metric exporter; a successful export lets the SDK's next export warning be logged."""

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result = super().export(metrics_data, timeout_millis, **kwargs)
        if result is MetricExportResult.SUCCESS:
            sdk_log_filter.rearm()
        return result


def _signal_endpoint(base: str | None, signal: str) -> str | None:
    """`BASE/v1/SIGNAL`, or None to let the exporter read `OTEL_EXPORTER_OTLP_*` itself."""
    return None if base is None else f"{base.rstrip('/')}/v1/{signal}"


@final
class Telemetry:
    """The running trace and metric pipelines; `start()` once per daemon, `shutdown()` at its end."""

    def __init__(
        self,
        config: TelemetryConfig,
        tracer_provider: TracerProvider | None,
        processor: _BoundedSpanProcessor | None,
        exporter: _CountingExporter | None,
        meter_provider: MeterProvider | None,
        metrics: _metrics.Metrics | None = None,
    ) -> None:
        self._config = config
        self.metrics = _metrics.Metrics() if metrics is None else metrics
        """The daemon's instruments, which this telemetry binds to its meter provider."""
        self._tracer_provider = tracer_provider
        self._processor = processor
        self._exporter = exporter
        self._meter_provider = meter_provider
        self._prometheus: CollectorRegistry | None = None
        self._snapshot: InMemoryMetricReader | None = None

    def __repr__(self) -> str:
        traces = "on" if self._processor else "off"
        metrics = "on" if self._meter_provider else "off"
        return f"<Telemetry traces {traces}, metrics {metrics} [spans dropped: {self.spans_dropped}]>"

    @property
    def spans_dropped(self) -> int:
        """Spans lost so far: queue full, or their export failed."""
        queued = self._processor.dropped if self._processor else 0
        return queued + (self._exporter.failed if self._exporter else 0)

    @property
    def metrics_live(self) -> bool:
        """Whether instruments record (some reader will read them)."""
        return self._meter_provider is not None

    def collect(self) -> MetricsData | None:
        """Every metric's current (cumulative) value, or None unless started with `collect`
        (or `start_collecting()` was called since)."""
        return self._snapshot.get_metrics_data() if self._snapshot is not None else None

    def prometheus_text(self) -> bytes | None:
        """The metrics in Prometheus text format 0.0.4, or None unless `prometheus` is on."""
        return generate_latest(self._prometheus) if self._prometheus is not None else None

    @classmethod
    def start(
        cls, config: TelemetryConfig, *, collect: bool = False, metrics: _metrics.Metrics | None = None
    ) -> Telemetry:
        """Build the exporters, make `tracer()` live in the caller's context (and the tasks it
        starts from now on), and bind `metrics` (the daemon's; by default `metrics.current()`).

        Metrics are recorded when any reader wants them: OTLP export (`metrics`), the
        Prometheus page (`prometheus`), or `collect` (the alerter reads `collect()`).
        """
        instruments = _metrics.current() if metrics is None else metrics
        disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or config.service_name}
        )
        tracer_provider = processor = exporter = None
        if config.traces and not disabled:
            exporter = _CountingExporter(
                OTLPSpanExporter(
                    endpoint=_signal_endpoint(config.endpoint, "traces"), timeout=config.export_timeout
                )
            )
            processor = _BoundedSpanProcessor(exporter, config.max_queue, config.export_timeout)
            links = int(os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT", _MAX_LINKS))
            ratio = TraceIdRatioBased(config.sample_ratio)
            ids = _ChosenIds()
            ids.bound = ratio.bound
            tracer_provider = TracerProvider(
                sampler=ParentBased(ratio),
                id_generator=ids,
                resource=resource,
                span_limits=SpanLimits(max_links=links),
                shutdown_on_exit=False,  # shutdown() bounds the flush; the SDK's atexit would not
            )
            tracer_provider.add_span_processor(processor)
            _tracer.set(tracer_provider.get_tracer("ferry"))
            _ids.set(ids)
        telemetry = cls(config, tracer_provider, processor, exporter, None, instruments)
        readers: list[MetricReader] = []
        if config.metrics and not disabled:
            readers.append(
                PeriodicExportingMetricReader(
                    _RearmingMetricExporter(
                        endpoint=_signal_endpoint(config.endpoint, "metrics"), timeout=config.export_timeout
                    ),
                    export_interval_millis=config.metrics_interval * 1000,
                    export_timeout_millis=config.export_timeout * 1000,
                )
            )
        if config.prometheus:
            telemetry._prometheus = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=telemetry._prometheus))
        if collect:
            telemetry._snapshot = InMemoryMetricReader()
            readers.append(telemetry._snapshot)
        if readers:
            # OTEL_SDK_DISABLED=true also makes this provider's meters no-ops (the SDK's rule)
            meter_provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
            telemetry._meter_provider = meter_provider
            instruments.bind(meter_provider.get_meter("ferry"), lambda: telemetry.spans_dropped)
        return telemetry

    def start_collecting(self) -> None:
        """Make `collect()` answer from now on (a reload added the first alert rules).

        The in-memory reader joins the running meter provider; without one (metrics and the
        Prometheus page off), a provider is built for it and the daemon's instruments bound to it,
        keeping the gauges' values reported so far. Counters count from now on.
        """
        if self._snapshot is not None:
            return
        self._snapshot = InMemoryMetricReader()
        if self._meter_provider is not None:
            self._meter_provider.add_metric_reader(self._snapshot)
            return
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or self._config.service_name}
        )
        self._meter_provider = MeterProvider(
            metric_readers=[self._snapshot], resource=resource, shutdown_on_exit=False
        )
        self.metrics.bind(self._meter_provider.get_meter("ferry"), lambda: self.spans_dropped)

    def shutdown(self) -> None:
        """Flush what is queued and stop exporting; returns within about 2 x `export_timeout`.

        The flush runs on a daemon thread that is abandoned at the bound, so a collector that
        hangs cannot hold the daemon's exit. Unless the last span export succeeded (no collector,
        or none seen yet), the bound is one second: a collector that is there takes a batch in
        milliseconds, and waiting on one that is not would only delay the exit.
        """
        _tracer.set(None)
        _ids.set(None)
        timeout_ms = int(self._config.export_timeout * 1000)

        def flush() -> None:
            if self._processor is not None:
                self._processor.shutdown_within(timeout_ms)
            if self._meter_provider is not None:
                self._meter_provider.shutdown(timeout_millis=timeout_ms)

        thread = threading.Thread(target=flush, name="ferry-telemetry-flush", daemon=True)
        thread.start()
        down = self._exporter is not None and not self._exporter.reachable
        thread.join(min(1.0, self._config.export_timeout) if down else 2 * self._config.export_timeout + 0.5)
        self.metrics.bind(NoOpMeter("ferry"))
        if self.spans_dropped:
            log.warning("spans dropped", extra={"fields": {"spans": self.spans_dropped}})
