"""A real OTLP/HTTP receiver for tests: decodes the protobuf requests the daemon exports.

Spans (`POST /v1/traces`, `ExportTraceServiceRequest`) are kept as `Span`s; metric points
(`POST /v1/metrics`, `ExportMetricsServiceRequest`) keep the latest value per name and
attribute set (the daemon exports cumulative sums).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BufferedIOBase
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.fakes import QuietHandler, serve


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int  # 2 = SERVER, 3 = CLIENT (OTLP's enum)
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    service: str


SERVER, CLIENT = 2, 3
MetricKey = tuple[str, frozenset[tuple[str, Any]]]


@dataclass
class OtlpReceiver:
    """Collects what an OTLP/HTTP exporter sends; `wait_spans` / `wait_metrics` poll with a deadline."""

    spans: list[Span] = field(default_factory=list)
    metrics: dict[MetricKey, float] = field(default_factory=dict)
    raw: list[bytes] = field(default_factory=list)
    """Every request body as received (to search for what must never be exported)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    hang_after: int | None = None
    """A collector that hangs: answer this many trace exports, then no request whole (each later
    one, and every metrics export, gets its reply head a byte per 0.2 s until `stop`, so no
    read timeout of the exporter's ever fires)."""
    hanging: Counter[str] = field(default_factory=Counter)
    """Requests held that way so far, by path."""
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    receiver.raw.append(body)
                    hang = receiver.hang_after is not None and (
                        self.path != "/v1/traces" or receiver.hang_after <= 0
                    )
                    if receiver.hang_after is not None and not hang:
                        receiver.hang_after -= 1
                    receiver.hanging[self.path] += hang
                if hang:
                    receiver._trickle(self.wfile)
                    return
                if self.path == "/v1/traces":
                    receiver._traces(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.reply(404, {}, b"")
                    return
                self.reply(200, {"content-type": "application/x-protobuf"}, reply)

        self.server = serve(Handler)
        self.port = self.server.server_address[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _trickle(self, out: BufferedIOBase) -> None:
        try:
            out.write(b"HTTP/1.1 200 OK\r\nX-Hanging: ")
            while not self._stopping.wait(0.2):
                out.write(b"a")
                out.flush()
        except OSError:
            return  # the exporter gave up (or its process exited)

    def _traces(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        Span(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            span.kind,
                            _attributes(span.attributes),
                            [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            service,
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        latest: dict[MetricKey, float] = {}
        for resource_metrics in request.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        key = (metric.name, frozenset(_attributes(point.attributes).items()))
                        if kind == "histogram":
                            latest[key] = point.count
                        else:
                            latest[key] = point.as_int if point.HasField("as_int") else point.as_double
        with self.lock:
            self.metrics.update(latest)

    def wait_spans(self, predicate: Callable[[list[Span]], bool], timeout: float = 30.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = [(s.name, s.trace_id[:8]) for s in spans]
                raise AssertionError(f"spans never matched within {timeout}s; got {names}")
            time.sleep(0.02)

    def metric(self, name: str, **attributes: Any) -> float:
        """The latest value of `name` for exactly these attributes (0 if never exported)."""
        with self.lock:
            return self.metrics.get((name, frozenset(attributes.items())), 0)

    def wait_metrics(self, predicate: Callable[[OtlpReceiver], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                with self.lock:
                    seen = {name: value for (name, _), value in self.metrics.items()}
                raise AssertionError(f"metrics never matched within {timeout}s; latest: {seen}")
            time.sleep(0.02)


__all__ = ["CLIENT", "SERVER", "OtlpReceiver", "Span"]
