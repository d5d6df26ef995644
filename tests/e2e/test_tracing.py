"""Traces and metrics of the real daemon process, exported over OTLP/HTTP to a real receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.telemetry import otel as telemetry
from tests.fakes import HTTP, Daemon, FakeReceiver, Received, Reply, free_port, ok, until, write_config
from tests.otlp import CLIENT, SERVER, OtlpReceiver, Span

PIPELINE = """
[telemetry]
traces = true
sample_ratio = {ratio}
endpoint = "{otlp}"
metrics_interval = "200ms"
export_timeout = "{export_timeout}"

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id, name: .name}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
retry = {{ max_attempts = {attempts}, initial_backoff = "100ms", max_backoff = "200ms" }}
"""
PATHS = ("/v1/traces", "/v1/metrics")
INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def fast_span_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the standard variable; the daemon inherits it


def start(
    tmp_path: Path,
    otlp_url: str,
    sink_url: str,
    *,
    attempts: int = 20,
    port: int | None = None,
    ratio: float = 1.0,
    export_timeout: str = "2s",
) -> Daemon:
    body = PIPELINE.format(
        otlp=otlp_url, url=sink_url, attempts=attempts, ratio=ratio, export_timeout=export_timeout
    )
    config = write_config(tmp_path, body, port=port)
    return Daemon(config, tmp_path / "ferry.log").start()


def post(daemon: Daemon, n: int, headers: dict[str, str] | None = None) -> str:
    response = HTTP.post(f"{daemon.url}/hooks/demo", json={"id": n, "name": f"n{n}"}, headers=headers or {})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def in_trace(spans: list[Span], trace_id: str) -> dict[str, list[Span]]:
    by_name: dict[str, list[Span]] = {}
    for span in spans:
        if span.trace_id == trace_id:
            by_name.setdefault(span.name, []).append(span)
    return by_name


def test_a_webhook_transform_sink_run_is_one_trace_continuing_the_incoming_traceparent(
    tmp_path: Path, otlp: OtlpReceiver, receiver: FakeReceiver
) -> None:
    daemon = start(tmp_path, otlp.url, receiver.url)
    try:
        event_id = post(daemon, 1, {"traceparent": INCOMING})
        request = receiver.wait_for(lambda seen: len(seen) >= 1)[0]
        trace_id = INCOMING.split("-")[1]
        spans = otlp.wait_spans(
            lambda spans: (
                {"webhook receive", "store commit", "transformer map", "sink deliver"}
                <= set(in_trace(spans, trace_id))
            )
        )
    finally:
        daemon.stop()
    trace = in_trace(spans, trace_id)
    assert all(len(group) == 1 for group in trace.values()), trace
    server, commit = trace["webhook receive"][0], trace["store commit"][0]
    transform, deliver = trace["transformer map"][0], trace["sink deliver"][0]
    assert server.kind == SERVER
    assert server.parent_id == INCOMING.split("-")[2]
    assert server.service == "ferry"
    assert server.attributes["http.response.status_code"] == 202
    assert server.attributes["ferry.event_id"] == event_id
    assert commit.parent_id == server.span_id
    assert commit.attributes["ferry.event_id"] == event_id
    assert transform.parent_id == server.span_id
    assert transform.attributes["ferry.transform"] == "shape"
    assert deliver.kind == CLIENT
    assert deliver.parent_id == server.span_id
    assert deliver.attributes == {
        "ferry.sink": "crm",
        "ferry.event_id": f"{event_id}.shape",
        "ferry.delivery_id": f"{event_id}.shape.crm",
        "ferry.attempt": 1,
        "ferry.outcome": "delivered",
        "http.request.method": "POST",
        "url.full": f"{receiver.url}/contacts",
        "http.response.status_code": 200,
    }
    assert request.headers["traceparent"] == f"00-{trace_id}-{deliver.span_id}-01"


def test_a_delivery_retried_after_kill_9_and_a_restart_joins_the_events_trace(
    tmp_path: Path, otlp: OtlpReceiver
) -> None:
    failing = True

    def respond(_: Received) -> Reply:
        return (503, {}, b"down") if failing else ok(_)

    sink = FakeReceiver(responder=respond).start()
    port = free_port()
    try:
        daemon = start(tmp_path, otlp.url, sink.url, port=port, attempts=1000)
        post(daemon, 7)
        spans = otlp.wait_spans(lambda spans: any(s.name == "sink deliver" for s in spans))
        trace_id = next(s.trace_id for s in spans if s.name == "webhook receive")
        daemon.kill9()
        failing = False
        daemon = start(tmp_path, otlp.url, sink.url, port=port)
        try:
            delivered = otlp.wait_spans(
                lambda spans: any(s.attributes.get("ferry.outcome") == "delivered" for s in spans)
            )
        finally:
            daemon.stop()
    finally:
        sink.stop()
    final = next(s for s in delivered if s.attributes.get("ferry.outcome") == "delivered")
    server = next(s for s in delivered if s.name == "webhook receive")
    assert final.trace_id == trace_id
    assert final.parent_id == server.span_id
    assert final.attributes["ferry.attempt"] >= 2
    assert sink.snapshot()[-1].headers["traceparent"] == f"00-{trace_id}-{final.span_id}-01"


def test_with_no_collector_the_daemon_delivers_normally_and_stops_cleanly(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    daemon = start(tmp_path, f"http://127.0.0.1:{free_port()}", receiver.url)
    try:
        for n in range(30):
            post(daemon, n)
        receiver.wait_for(lambda seen: len(seen) >= 30, timeout=20)
    finally:
        daemon.stop()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0  # not killed by Daemon.stop's 15 s guard
    assert len({r.json()["id"] for r in receiver.snapshot()}) == 30


def test_a_hanging_collector_holds_the_stop_no_longer_than_the_flush_bound(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    """The flush at stop is bounded by `export_timeout` (about 2 x 1 s here), whatever the collector
    does: this one answers the first span export, then never finishes an answer, and trickles
    each reply so that no read timeout fires. Without the bound the stop would last as long as
    the trickle (until the test ends), past Daemon.stop's 15 s guard, which kills the daemon."""
    collector = OtlpReceiver(hang_after=1).start()
    try:
        daemon = start(tmp_path, collector.url, receiver.url, export_timeout="1s")
        try:
            for n in range(30):
                post(daemon, n)
            receiver.wait_for(lambda seen: len(seen) >= 30, timeout=20)
            # The stop comes while an export of each signal is provably stuck.
            until(lambda: [collector.hanging[path] for path in PATHS], all)
        finally:
            began = time.monotonic()
            daemon.stop()
            took = time.monotonic() - began
    finally:
        collector.stop()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0, f"killed after {took:.1f}s: the flush outlasted its bound"
    assert len({r.json()["id"] for r in receiver.snapshot()}) == 30
    print(f"\nstopped in {took:.2f}s with exports hanging")


def test_metric_values_match_a_scripted_run(tmp_path: Path, otlp: OtlpReceiver) -> None:
    received, dead = 6, {2, 5}

    def respond(request: Received) -> Reply:
        return (400, {}, b"no") if request.json()["id"] in dead else (200, {}, b"ok")

    sink = FakeReceiver(responder=respond).start()
    daemon = start(tmp_path, otlp.url, sink.url)
    try:
        for n in range(received):
            post(daemon, n)
        bad = httpx.post(
            f"{daemon.url}/hooks/demo", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        delivered = received - len(dead)
        otlp.wait_metrics(
            lambda m: (
                m.metric("ferry.deliveries", sink="crm", outcome="delivered") == delivered
                and m.metric("ferry.deliveries", sink="crm", outcome="dead") == len(dead)
                # the depth is sampled from the store each interval: it may lag the counters by one
                and m.metric("ferry.queue.depth", stage="crm") == 0
            )
        )
    finally:
        daemon.stop()
        sink.stop()
    assert otlp.metric("ferry.events.received", source="demo") == received
    assert otlp.metric("ferry.events.rejected", source="demo", reason="malformed_json") == 1
    assert otlp.metric("ferry.dead_letters", stage="crm") == len(dead)
    assert otlp.metric("ferry.delivery.attempts", sink="crm") == received
    assert otlp.metric("ferry.delivery.latency", sink="crm") == delivered  # histogram count
    assert otlp.metric("ferry.queue.depth", stage="crm") == 0
    assert otlp.metric("ferry.actor.restarts", actor="sink.crm") == 0


def test_sampling_leaves_out_whole_traces_and_an_incoming_sampled_traceparent_is_recorded(
    tmp_path: Path, otlp: OtlpReceiver, receiver: FakeReceiver
) -> None:
    daemon = start(tmp_path, otlp.url, receiver.url, ratio=0.0)
    try:
        for n in range(5):
            post(daemon, n)
        unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        post(daemon, 5, {"traceparent": unsampled})
        post(daemon, 6, {"traceparent": INCOMING})
        receiver.wait_for(lambda seen: len(seen) >= 7)
        otlp.wait_spans(lambda spans: {s.name for s in spans} >= {"webhook receive", "sink deliver"})
    finally:
        daemon.stop()  # its exit flushes every span it recorded: a left-out trace's would be here
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0
    spans = otlp.wait_spans(lambda spans: True)
    assert {span.trace_id for span in spans} == {INCOMING.split("-")[1]}
    sent = {r.json()["id"]: r.headers.get("traceparent") for r in receiver.snapshot()}
    assert sent[6] is not None
    assert sent[6].startswith(f"00-{INCOMING.split('-')[1]}-")
    # Nothing recorded, yet the context still propagates, with the sampled flag clear (W3C):
    # the receiver's tracing follows ferry's decision; a sender's unsampled trace id is kept.
    assert sent[5] is not None
    assert sent[5].startswith(f"00-{unsampled.split('-')[1]}-")
    assert all(telemetry.parse_traceparent(sent[n]) is not None for n in range(6))
    assert all(str(sent[n]).endswith("-00") for n in range(6))
    assert len({str(sent[n]).split("-")[1] for n in range(5)}) == 5  # a new trace per event
