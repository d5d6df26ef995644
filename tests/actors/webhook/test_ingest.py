"""The ingest batcher: its count of events received (`ferry ctl status` rates, systemd STATUS), its span."""

from __future__ import annotations

import httpx
import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from actors.webhook.config import ListenerConfig
from actors.webhook.ingest import IngestBatcher
from actors.webhook.listener import WebhookListener, WebhookRoute
from daemon.store.sqlite import Store
from daemon.telemetry import otel


async def test_events_counts_stored_events_not_duplicates(store: Store, nursery: trio.Nursery) -> None:
    batcher = IngestBatcher(store, sinks={"demo": []}, consumers={}, dedup_window=3600)
    await nursery.start(batcher.run)
    first = await batcher("demo", b'{"n":1}', "key-1", None)
    again = await batcher("demo", b'{"n":1}', "key-1", None)
    other = await batcher("demo", b'{"n":2}', None, None)
    assert (first[1], again[1], other[1]) == (False, True, False)
    assert again[0] == first[0]
    assert batcher.events == 2


async def test_the_store_commit_span_is_a_child_of_the_request_span_handed_on_not_parsed_back(
    store: Store, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr("daemon.telemetry.otel.tracer", lambda: provider.get_tracer("test"))
    parsed: list[str] = []
    parse = otel.parse_traceparent

    def counting(value: str | None) -> SpanContext | None:
        if value is not None:
            parsed.append(value)
        return parse(value)

    monkeypatch.setattr("daemon.telemetry.otel.parse_traceparent", counting)
    batcher = IngestBatcher(store, sinks={"demo": []}, consumers={}, dedup_window=3600)
    await nursery.start(batcher.run)
    routes = {"/hooks/demo": WebhookRoute("demo", None)}
    listener = WebhookListener(ListenerConfig(address="127.0.0.1:0"), routes, batcher, lambda: True)
    [(host, port)] = await nursery.start(listener.run)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        response = await client.post("/hooks/demo", json={"n": 1}, headers={"traceparent": INCOMING})
        assert response.status_code == 202
    spans = {span.name: span for span in exporter.get_finished_spans()}
    server, commit = spans["webhook receive"], spans["store commit"]
    assert commit.parent is not None
    assert server.context is not None
    assert commit.parent == server.context
    assert set(parsed) == {INCOMING}  # the server span's own context was never formatted and re-read


INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
