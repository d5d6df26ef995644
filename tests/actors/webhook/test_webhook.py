"""The webhook listener, served for real on 127.0.0.1 and spoken to over real sockets."""

from __future__ import annotations

import logging
import select
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
from opentelemetry.trace import Span

from actors.webhook.config import ListenerConfig
from actors.webhook.listener import IngestResult, WebhookListener, WebhookRoute
from actors.webhook.verify import ApiKeyVerifier
from daemon.config.units import Duration, Size
from daemon.errors import StoreUnavailable

ROUTES = {
    "/hooks/demo": WebhookRoute("demo", "Idempotency-Key"),
    "/hooks/plain": WebhookRoute("plain", None),
}
JSON = {"Content-Type": "application/json"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Call:
    source: str
    body: bytes
    dedup_key: str | None
    traceparent: str | None


class FakeIngest:
    """Records every call; fails or blocks on cue; remembers dedup keys like the store does."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.error: Exception | None = None
        self.gate: trio.Event | None = None
        self.entered = trio.Event()
        self._seen: dict[str, str] = {}

    async def __call__(
        self,
        source: str,
        body: bytes,
        dedup_key: str | None,
        traceparent: str | None,
        replay: tuple[str, float] | None = None,
        *,
        parent: Span | None = None,
    ) -> IngestResult:
        self.calls.append(Call(source, body, dedup_key, traceparent))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        if dedup_key is not None and dedup_key in self._seen:
            return self._seen[dedup_key], True
        event_id = f"evt-{len(self.calls)}"
        if dedup_key is not None:
            self._seen[dedup_key] = event_id
        return event_id, False


@dataclass
class Server:
    listener: WebhookListener
    ingest: FakeIngest
    port: int
    ready: list[bool] = field(default_factory=lambda: [True])
    paused: set[str] = field(default_factory=set)
    overloaded: list[bool] = field(default_factory=lambda: [False])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connect(self) -> RawClient:
        return RawClient(await trio.open_tcp_stream("127.0.0.1", self.port))


async def serve(nursery: trio.Nursery, **limits: Any) -> Server:
    config = ListenerConfig(address="127.0.0.1:0", **limits)
    ingest = FakeIngest()
    ready = [True]
    paused: set[str] = set()
    overloaded = [False]
    listener = WebhookListener(
        config,
        ROUTES,
        ingest,
        lambda: ready[0],
        paused=lambda source: source in paused,
        overloaded=lambda: overloaded[0],
    )
    bound = await nursery.start(listener.run)
    assert bound[0][0] == "127.0.0.1"
    return Server(listener, ingest, bound[0][1], ready, paused, overloaded)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class RawClient:
    """Raw bytes out, minimally parsed responses in: for what a polite client would never send."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self._buffer += data
        return bool(data)

    async def response(self, *, bodiless: bool = False) -> Response:
        """The next response; `bodiless`: the answer to a HEAD (no body, whatever its content-length)."""
        while b"\r\n\r\n" not in self._buffer:
            assert await self._fill(), f"connection closed mid-response: {self._buffer!r}"
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if bodiless else int(headers["content-length"])
        while len(self._buffer) < length:
            assert await self._fill(), "connection closed mid-body"
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)

    async def closed(self) -> bool:
        """Wait for the server's end: True on a clean EOF with nothing more sent."""
        try:
            while await self._fill():
                pass
        except trio.BrokenResourceError:
            return not self._buffer
        return not self._buffer

    async def aclose(self) -> None:
        await self.stream.aclose()


def post(path: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


JSON_POST = post("/hooks/demo", b'{"a": 1}', "Content-Type: application/json")


# --- accepted events -------------------------------------------------------------------------


async def test_post_is_acknowledged_with_the_event_id(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b'{"a": 1}', headers=JSON)
    assert response.status_code == 202
    assert response.json() == {"id": "evt-1"}
    assert response.headers["content-type"] == "application/json"
    assert server.ingest.calls == [Call("demo", b'{"a": 1}', None, None)]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/cloudevents+json",
    ],
)
async def test_json_content_types_are_accepted(nursery: trio.Nursery, content_type: str) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b"[]", headers={"Content-Type": content_type})
    assert response.status_code == 202


async def test_query_string_does_not_change_the_route(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/plain?token=x", content=b"{}", headers=JSON)
    assert response.status_code == 202
    assert server.ingest.calls[0].source == "plain"


async def test_idempotency_header_is_passed_whatever_its_case(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(post("/hooks/demo", b"{}", "Content-Type: application/json", "iDEMPOTENCY-key: k-1"))
    assert (await client.response()).status == 202
    assert server.ingest.calls[0].dedup_key == "k-1"


async def test_idempotency_header_is_ignored_for_a_route_without_one(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/hooks/plain", content=b"{}", headers={**JSON, "Idempotency-Key": "k-1"})
    assert server.ingest.calls[0].dedup_key is None


async def test_duplicate_answers_200_with_the_original_id(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    headers = {**JSON, "Idempotency-Key": "k-1"}
    async with httpx.AsyncClient(base_url=server.url) as client:
        first = await client.post("/hooks/demo", content=b"{}", headers=headers)
        second = await client.post("/hooks/demo", content=b"{}", headers=headers)
    assert (first.status_code, first.json()) == (202, {"id": "evt-1"})
    assert (second.status_code, second.json()) == (200, {"id": "evt-1", "duplicate": True})


async def test_traceparent_is_passed_through(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/hooks/demo", content=b"{}", headers={**JSON, "traceparent": TRACEPARENT})
    assert server.ingest.calls[0].traceparent == TRACEPARENT


async def test_no_answer_is_sent_before_ingest_returns(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    server.ingest.gate = trio.Event()
    client = await server.connect()
    await client.send(JSON_POST)
    await server.ingest.entered.wait()
    await trio.testing.wait_all_tasks_blocked()
    readable, _, _ = select.select([client.stream.socket.fileno()], [], [], 0)
    assert readable == []
    server.ingest.gate.set()
    assert (await client.response()).status == 202


async def test_chunked_body_is_accepted(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    head = b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    await client.send(head + b'Transfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n')
    assert (await client.response()).status == 202
    assert server.ingest.calls[0].body == b'{"a": 1}'


async def test_expect_100_continue_is_honoured(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    request = post("/hooks/demo", b"{}", "Content-Type: application/json", "Expect: 100-continue")
    head, body = request[:-2], request[-2:]
    await client.send(head)
    while b"\r\n\r\n" not in client._buffer:
        assert await client._fill()
    interim, _, client._buffer = client._buffer.partition(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 ")
    await client.send(body)
    assert (await client.response()).status == 202


# --- keep-alive --------------------------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    for number in range(1, 4):
        await client.send(JSON_POST)
        response = await client.response()
        assert (response.status, response.json()) == (202, {"id": f"evt-{number}"})
    assert server.listener.connections == 1


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(JSON_POST * 3)
    assert [(await client.response()).json()["id"] for _ in range(3)] == ["evt-1", "evt-2", "evt-3"]


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(post("/hooks/demo", b"{}", "Content-Type: application/json", "Connection: close"))
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (202, "close")
    assert await client.closed()


async def test_http_1_0_closes_after_the_response(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(post("/hooks/demo", b"{}", "Content-Type: application/json", version="1.0"))
    assert (await client.response()).status == 202
    assert await client.closed()


# --- refusals ----------------------------------------------------------------------------------


async def test_malformed_json_is_400_with_the_reason(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b'{"a": tru}', headers=JSON)
    assert response.status_code == 400
    assert response.json() == {"error": "malformed JSON: JSON is malformed: invalid character (byte 10)"}
    assert server.ingest.calls == []


@pytest.mark.parametrize(
    "headers", [{"Content-Type": "text/plain"}, {}, {"Content-Type": "application/jsonx"}]
)
async def test_wrong_or_missing_content_type_is_415(nursery: trio.Nursery, headers: dict[str, str]) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b"{}", headers=headers)
        after = await client.post("/hooks/demo", content=b"{}", headers=JSON)
    assert response.status_code == 415
    assert response.json()["error"].startswith("content type must be application/json")
    assert after.status_code == 202  # the refused body was drained; the connection lives on
    assert len(server.ingest.calls) == 1


async def test_unknown_path_is_404(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/nope", content=b"{}", headers=JSON)
    assert (response.status_code, response.json()) == (404, {"error": "no webhook at /hooks/nope"})


async def test_other_methods_are_405_with_allow(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/hooks/demo")
        health = await client.post("/healthz", content=b"{}")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")
    assert response.json() == {"error": "method GET not allowed"}
    assert (health.status_code, health.headers["allow"]) == (405, "GET, HEAD")


async def test_declared_body_over_the_limit_is_413_without_reading_it(nursery: trio.Nursery) -> None:
    server = await serve(nursery, max_body=Size(100))
    client = await server.connect()
    head = b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    await client.send(head + b"Content-Length: 1000000\r\n\r\n{")  # the rest never comes
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (413, "close")
    assert response.json() == {"error": "request body larger than 100 bytes"}
    assert await client.closed()
    assert server.ingest.calls == []


async def test_chunked_body_over_the_limit_is_413_once_it_passes_the_limit(nursery: trio.Nursery) -> None:
    server = await serve(nursery, max_body=Size(100))
    client = await server.connect()
    head = b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    await client.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
    await client.send(
        b"40\r\n" + b" " * 64 + b"\r\n" + b"40\r\n" + b" " * 64 + b"\r\n"
    )  # 128 > 100, unfinished
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (413, "close")
    assert await client.closed()
    assert server.ingest.calls == []


async def test_store_unavailable_is_503_retry_after_1(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    server.ingest.error = StoreUnavailable("disk full")
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b"{}", headers=JSON)
        server.ingest.error = None
        after = await client.post("/hooks/demo", content=b"{}", headers=JSON)
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    assert "store unavailable" in response.json()["error"]
    assert after.status_code == 202


async def test_unexpected_ingest_error_is_500_logged_and_survived(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(nursery)
    server.ingest.error = RuntimeError("boom")
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b"{}", headers=JSON)
        server.ingest.error = None
        after = await client.post("/hooks/demo", content=b"{}", headers=JSON)
    assert (response.status_code, response.json()) == (500, {"error": "internal error, event not accepted"})
    assert after.status_code == 202
    [record] = [r for r in caplog.records if r.name == "ferry.webhook" and r.levelno == logging.ERROR]
    assert record.exc_info is not None
    assert "boom" in str(record.exc_info[1])


async def test_paused_source_is_503_retry_after_5(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    server.paused.add("demo")
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/hooks/demo", content=b"{}", headers=JSON)
        other = await client.post("/hooks/plain", content=b"{}", headers=JSON)
    assert (response.status_code, response.headers["retry-after"]) == (503, "5")
    assert response.json() == {"error": "source demo is paused"}
    assert other.status_code == 202
    assert [call.source for call in server.ingest.calls] == ["plain"]


async def test_garbage_is_400_and_closes(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(b"\x16\x03\x01 this is not http\r\n\r\n")
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (400, "close")
    assert response.json()["error"].startswith("malformed HTTP request")
    assert await client.closed()


async def test_bad_header_is_400(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
    assert (await client.response()).status == 400
    assert await client.closed()


@pytest.mark.parametrize("finished", [True, False])
async def test_oversized_head_is_431_and_closes(nursery: trio.Nursery, finished: bool) -> None:
    server = await serve(nursery, max_header=Size(1024))
    client = await server.connect()
    head = b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4096 + b"\r\n"
    await client.send(head + (b"\r\n" if finished else b""))
    response = await client.response()
    assert (response.status, response.json()) == (431, {"error": "request head larger than 1024 bytes"})
    assert await client.closed()


# --- health ----------------------------------------------------------------------------------


async def test_healthz_and_readyz(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        server.ready[0] = False
        not_ready = await client.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (not_ready.status_code, not_ready.json()) == (503, {"status": "not ready"})


# --- timeouts --------------------------------------------------------------------------------


async def test_slow_head_is_408_and_closes(nursery: trio.Nursery) -> None:
    server = await serve(nursery, header_timeout=Duration(0.2))
    client = await server.connect()
    await client.send(b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\n")  # ...and nothing more
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (408, "close")
    assert response.json() == {"error": "timed out receiving the request head"}
    assert await client.closed()


async def test_silent_new_connection_is_closed_without_an_answer(nursery: trio.Nursery) -> None:
    server = await serve(nursery, header_timeout=Duration(0.2))
    client = await server.connect()
    assert await client.closed()


async def test_slow_body_is_408_and_closes(nursery: trio.Nursery) -> None:
    server = await serve(nursery, body_timeout=Duration(0.2))
    client = await server.connect()
    await client.send(JSON_POST[:-3])
    response = await client.response()
    assert (response.status, response.json()) == (408, {"error": "timed out receiving the request body"})
    assert await client.closed()
    assert server.ingest.calls == []


async def test_idle_keep_alive_connection_is_closed_silently(nursery: trio.Nursery) -> None:
    server = await serve(nursery, idle_timeout=Duration(0.2))
    client = await server.connect()
    await client.send(JSON_POST)
    assert (await client.response()).status == 202
    assert await client.closed()


async def test_next_request_head_is_timed_from_its_first_byte(nursery: trio.Nursery) -> None:
    server = await serve(nursery, idle_timeout=Duration(60), header_timeout=Duration(0.2))
    client = await server.connect()
    await client.send(JSON_POST)
    assert (await client.response()).status == 202
    await client.send(JSON_POST[:10])
    assert (await client.response()).status == 408


# --- connections -----------------------------------------------------------------------------


async def wait_for_connections(listener: WebhookListener, count: int) -> None:
    with trio.fail_after(5):
        while listener.connections != count:
            await trio.sleep(0.005)


async def test_connections_over_the_limit_get_503_while_every_one_is_being_stored(
    nursery: trio.Nursery,
) -> None:
    server = await serve(nursery, max_connections=1)
    server.ingest.gate = trio.Event()
    first = await server.connect()
    await first.send(JSON_POST)
    await server.ingest.entered.wait()  # `first` is now busy: its request is being stored

    second = await server.connect()
    await second.send(JSON_POST)
    response = await second.response()
    assert (response.status, response.json()) == (503, {"error": "too many connections"})
    assert response.headers["connection"] == "close"
    assert await second.closed()
    assert server.listener.connections == 1

    server.ingest.gate.set()
    assert (await first.response()).status == 202, "a busy connection was cut short for room"
    await first.aclose()
    await wait_for_connections(server.listener, 0)
    third = await server.connect()
    await third.send(JSON_POST)
    assert (await third.response()).status == 202
    assert len(server.ingest.calls) == 2


@pytest.mark.parametrize(
    "stall",
    [b"", b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\n", JSON_POST[:-3]],
    ids=["idle", "slow-head", "slow-body"],
)
async def test_at_the_limit_the_longest_waiting_connection_makes_room(
    nursery: trio.Nursery, stall: bytes
) -> None:
    server = await serve(nursery, max_connections=3)
    stalled = []
    for _ in range(3):
        client = await server.connect()
        await client.send(stall)
        stalled.append(client)
    await wait_for_connections(server.listener, 3)

    prompt = await server.connect()
    await prompt.send(JSON_POST)
    assert (await prompt.response()).status == 202
    assert await stalled[0].closed(), "the oldest waiting connection was not the one closed"
    assert server.listener.connections == 3
    assert server.listener.evictions == 1
    assert len(server.ingest.calls) == 1, "a half-sent request was stored"


async def test_an_idle_keep_alive_connection_makes_room_before_a_younger_slow_one(
    nursery: trio.Nursery,
) -> None:
    server = await serve(nursery, max_connections=2)
    slow = await server.connect()
    await slow.send(b"POST /hooks/demo HTTP/1.1\r\n")
    await wait_for_connections(server.listener, 1)
    served = await server.connect()
    await served.send(JSON_POST)
    assert (await served.response()).status == 202  # idle from now on: younger than `slow`'s wait

    newcomer = await server.connect()
    await newcomer.send(JSON_POST)
    assert (await newcomer.response()).status == 202
    assert await slow.closed()
    await served.send(JSON_POST)
    assert (await served.response()).status == 202


async def test_overloaded_store_sheds_with_503_retry_after_and_stores_nothing(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    server.overloaded[0] = True
    async with httpx.AsyncClient(base_url=server.url) as client:
        shed = await client.post("/hooks/demo", content=b"{}", headers=JSON)
        server.overloaded[0] = False
        after = await client.post("/hooks/demo", content=b"{}", headers=JSON)
    assert (shed.status_code, shed.headers["retry-after"]) == (503, "1")
    assert shed.json()["error"].startswith("overloaded: too many requests waiting for the store")
    assert "connection" not in shed.headers, "shedding should keep the connection"
    assert after.status_code == 202
    assert len(server.ingest.calls) == 1


async def test_cancelling_run_closes_open_connections() -> None:
    async with trio.open_nursery() as nursery:
        server = await serve(nursery)
        client = await server.connect()
        await client.send(JSON_POST)
        assert (await client.response()).status == 202
        nursery.cancel_scope.cancel()
    assert await client.closed()
    assert server.listener.connections == 0


async def test_socket_activated_listeners_are_served(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    config = ListenerConfig(address="0.0.0.0:1")  # ignored when listeners are given
    listener = WebhookListener(config, ROUTES, FakeIngest(), lambda: True, listeners=lambda: listeners)
    [(host, port)] = await nursery.start(listener.run)
    assert (host, port) == listeners[0].socket.getsockname()
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200


def test_repr_names_address_routes_and_connections() -> None:
    listener = WebhookListener(ListenerConfig(address="127.0.0.1:0"), ROUTES, FakeIngest(), lambda: True)
    assert repr(listener) == "<WebhookListener 127.0.0.1:0 [2 routes, 0 open]>"


# --- reload ----------------------------------------------------------------------------------


async def test_reroute_serves_the_new_routes_on_a_connection_already_open(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(JSON_POST)
    assert (await client.response()).status == 202
    server.listener.reroute({"/hooks/other": WebhookRoute("other", None)})
    await client.send(JSON_POST)
    gone = await client.response()
    assert (gone.status, gone.json()) == (404, {"error": "no webhook at /hooks/demo"})
    await client.send(post("/hooks/other", b"{}", "Content-Type: application/json"))
    assert (await client.response()).status == 202
    assert [call.source for call in server.ingest.calls] == ["demo", "other"]


async def test_a_route_removed_while_the_body_arrives_answers_404_and_stores_nothing(
    nursery: trio.Nursery,
) -> None:
    server = await serve(nursery)
    client = await server.connect()
    head, body = JSON_POST[:-3], JSON_POST[-3:]
    await client.send(head)
    await trio.testing.wait_all_tasks_blocked()  # the listener has read the head and waits for the body
    server.listener.reroute({})
    await client.send(body)
    assert (await client.response()).status == 404
    assert server.ingest.calls == []


async def test_a_route_reloaded_while_the_body_arrives_verifies_with_the_new_routes_keys(
    nursery: trio.Nursery,
) -> None:
    server = await serve(nursery)
    old = ApiKeyVerifier(b"x-api-key", b"", [b"old-key"])
    server.listener.reroute({"/hooks/demo": WebhookRoute("demo", None, old)})
    request = post("/hooks/demo", b'{"a": 1}', "Content-Type: application/json", "X-Api-Key: old-key")
    client = await server.connect()
    await client.send(request[:-3])
    await trio.testing.wait_all_tasks_blocked()  # the head passed the old key; the body is awaited
    new = ApiKeyVerifier(b"x-api-key", b"", [b"new-key"])
    server.listener.reroute({"/hooks/demo": WebhookRoute("demo", None, new)})  # the key was rotated
    await client.send(request[-3:])
    refused = await client.response()
    assert (refused.status, refused.json()["reason"]) == (401, "credentials_mismatch")
    assert server.ingest.calls == []


async def test_a_route_reloaded_while_the_body_arrives_deduplicates_by_the_new_routes_header(
    nursery: trio.Nursery,
) -> None:
    server = await serve(nursery)
    request = post(
        "/hooks/demo", b'{"a": 1}', "Content-Type: application/json", "Idempotency-Key: a", "X-Delivery: b"
    )
    client = await server.connect()
    await client.send(request[:-3])
    await trio.testing.wait_all_tasks_blocked()
    server.listener.reroute({"/hooks/demo": WebhookRoute("demo", "X-Delivery")})
    await client.send(request[-3:])
    assert (await client.response()).status == 202
    assert [call.dedup_key for call in server.ingest.calls] == ["b"]


# --- at the door: nesting, framing, HEAD, protocol errors --------------------------------------


async def test_json_nested_past_max_depth_is_400_before_it_is_decoded(nursery: trio.Nursery) -> None:
    server = await serve(nursery, max_depth=8)
    async with httpx.AsyncClient(base_url=server.url) as client:
        at_limit = await client.post("/hooks/demo", content=b"[" * 8 + b"]" * 8, headers=JSON)
        past = await client.post("/hooks/demo", content=b'{"a":' * 9 + b"1" + b"}" * 9, headers=JSON)
        strings = await client.post("/hooks/demo", content=b'["[[[[[[[[[[[[", "{{{{{{{{{{"]', headers=JSON)
        # past Python's recursion limit: the decoder itself would raise RecursionError
        huge = await client.post("/hooks/demo", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)
    assert (at_limit.status_code, strings.status_code) == (202, 202)
    for response in (past, huge):
        assert (response.status_code, response.json()) == (
            400,
            {"error": "JSON nested deeper than 8 levels ([listener] max_depth)"},
        )
    assert len(server.ingest.calls) == 2


async def test_a_number_out_of_range_is_400_with_the_reason(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    async with httpx.AsyncClient(base_url=server.url) as client:
        for body in (b'{"n": 1' + b"0" * 5000 + b"}", b'{"n": 1e400}'):
            response = await client.post("/hooks/demo", content=body, headers=JSON)
            assert response.status_code == 400
            assert response.json()["error"].startswith("JSON number out of range")
    assert server.ingest.calls == []


async def test_content_length_with_transfer_encoding_is_400_and_closes(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    smuggled = post("/hooks/demo", b'{"b": 2}', "Content-Type: application/json")
    await client.send(
        b"POST /hooks/demo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{"a": 1}\r\n0\r\n\r\n' + smuggled
    )
    response = await client.response()
    assert (response.status, response.headers["connection"]) == (400, "close")
    assert "both Content-Length and Transfer-Encoding" in response.json()["error"]
    assert await client.closed()  # the pipelined request is never served
    assert server.ingest.calls == []


async def test_head_is_answered_like_get_without_a_body(nursery: trio.Nursery) -> None:
    server = await serve(nursery)
    client = await server.connect()
    await client.send(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await client.response(bodiless=True)
    await client.send(b"HEAD /hooks/demo HTTP/1.1\r\nHost: t\r\n\r\n")
    await client.send(b"HEAD /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    hook, nowhere = await client.response(bodiless=True), await client.response(bodiless=True)
    await client.send(JSON_POST)  # the same connection still serves
    after = await client.response()
    assert (head.status, head.headers["content-length"]) == (200, str(len(b'{"status":"ok"}')))
    assert (hook.status, hook.headers["allow"]) == (405, "POST")
    assert (nowhere.status, after.status) == (404, 202)


async def test_protocol_errors_are_logged_at_a_bounded_rate_without_tracebacks(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(nursery)
    for _ in range(20):
        client = await server.connect()
        await client.send(b"\x16\x03\x01 this is not http\r\n\r\n")
        assert (await client.response()).status == 400
        await client.aclose()
    records = [r for r in caplog.records if r.name == "ferry.webhook" and r.levelno >= logging.WARNING]
    assert len(records) == 1  # the next line may come 10 s later, naming the 19 left out
    assert "malformed HTTP request" in records[0].getMessage()
    assert records[0].exc_info is None
