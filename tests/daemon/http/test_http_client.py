"""Both HTTP clients against a real HTTP/1.1 server on 127.0.0.1 that answers on cue."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from daemon.errors import PermanentDelivery, RetryableDelivery
from daemon.http.client import HttpClient, LeanClient, make_client, parse_retry_after
from tests.daemon.http.serving import serve

KINDS = ["lean", "httpx"]


@dataclass
class Cue:
    """How the fake receiver answers one request."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b'{"ok":true}'
    chunks: int = 0  # > 0: send the body chunked, in this many pieces
    close: bool = False  # answer with "Connection: close", then close
    hang: bool = False  # never answer; wait for the client to close
    drop: bool = False  # close the connection without answering
    gate: trio.Event | None = None  # wait for this before answering


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class FakeReceiver:
    """A receiving API: records every request, answers from `cues` (then 200), counts connections."""

    url: str = ""
    cues: deque[Cue] = field(default_factory=deque)
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed_connections: int = 0
    ssl_context: ssl.SSLContext | None = None
    _idle: set[trio.abc.Stream] = field(default_factory=set)
    _changed: trio.Event = field(default_factory=trio.Event)

    def cue(self, *cues: Cue) -> None:
        self.cues.extend(cues)

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not predicate():
                await self._changed.wait()

    async def close_idle(self) -> None:
        """Close every keep-alive connection waiting for its next request, as an idle timeout does."""
        for stream in list(self._idle):
            await trio.aclose_forcefully(stream)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        number = self.connections
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(stream, conn)
                if request is None:
                    return
                self._idle.discard(stream)
                cue = self.cues.popleft() if self.cues else Cue()
                headers = {k.decode(): v.decode() for k, v in request.headers}
                self.requests.append(
                    Seen(request.method.decode(), request.target.decode(), headers, body, number)
                )
                self._bump()
                if cue.hang:  # until the client gives up and closes
                    while await stream.receive_some(65536):
                        pass
                    return
                if cue.drop:
                    return
                if cue.gate is not None:
                    await cue.gate.wait()
                await self._respond(stream, conn, cue)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self._idle.discard(stream)
            await trio.aclose_forcefully(stream)
            self.closed_connections += 1
            self._bump()

    @staticmethod
    async def _read_request(
        stream: trio.abc.Stream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:  # ConnectionClosed: the client went away between requests
                return None, b""

    async def _respond(self, stream: trio.abc.Stream, conn: h11.Connection, cue: Cue) -> None:
        headers = list(cue.headers)
        if not cue.chunks:
            headers.append(("Content-Length", str(len(cue.body))))
        if cue.close:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=cue.status, headers=headers)) or b""
        step = -(-len(cue.body) // max(cue.chunks, 1))
        for start in range(0, len(cue.body), step or 1):
            data += conn.send(h11.Data(data=cue.body[start : start + step])) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        if conn.our_state is not h11.MUST_CLOSE:
            self._idle.add(stream)  # idle from the moment the last byte is handed over
        await stream.send_all(data)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> FakeReceiver:
    fake = FakeReceiver()
    fake.url = f"http://127.0.0.1:{await serve(nursery, fake.handle)}"
    return fake


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(kind: str) -> AsyncIterator[HttpClient]:
    c = make_client(kind)  # type: ignore[arg-type]
    yield c
    await c.aclose()


async def get(client: HttpClient, url: str, timeout: float = 5.0) -> object:
    return await client.request("GET", url, headers=[], body=b"", timeout=timeout)


# --- what goes over the wire ----------------------------------------------------------


async def test_post_body_and_headers_arrive(client: HttpClient, receiver: FakeReceiver) -> None:
    response = await client.request(
        "POST",
        receiver.url + "/hooks/crm?x=1",
        headers=[("Content-Type", "application/json"), ("Idempotency-Key", "d-42")],
        body=b'{"id": 42}',
        timeout=5,
    )
    assert (response.status, response.body) == (200, b'{"ok":true}')
    [seen] = receiver.requests
    assert (seen.method, seen.target, seen.body) == ("POST", "/hooks/crm?x=1", b'{"id": 42}')
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["idempotency-key"] == "d-42"
    assert seen.headers["content-length"] == "10"
    assert seen.headers["host"] == receiver.url.removeprefix("http://")
    assert seen.headers["user-agent"] == "ferry/0.1"


async def test_given_user_agent_replaces_the_default(client: HttpClient, receiver: FakeReceiver) -> None:
    await client.request("PUT", receiver.url, headers=[("User-Agent", "crm-sync")], body=b"{}", timeout=5)
    assert receiver.requests[0].headers["user-agent"] == "crm-sync"
    assert receiver.requests[0].target == "/"


async def test_credentials_in_url_become_basic_auth(client: HttpClient, receiver: FakeReceiver) -> None:
    await get(client, receiver.url.replace("//", "//ferry:s%40cret@"))
    assert receiver.requests[0].headers["authorization"] == "Basic ZmVycnk6c0BjcmV0"


async def test_a_500_is_a_response_not_an_error(client: HttpClient, receiver: FakeReceiver) -> None:
    receiver.cue(Cue(status=503, headers=[("Retry-After", "7"), ("X-Trace", "a"), ("X-Trace", "b")]))
    response = await client.request("POST", receiver.url, headers=[], body=b"{}", timeout=5)
    assert response.status == 503
    assert response.header("retry-after") == response.header("RETRY-AFTER") == "7"
    assert response.header("x-trace") == "a"
    assert response.header("x-missing") is None
    assert ("x-trace", "b") in response.headers


async def test_chunked_response_is_reassembled(client: HttpClient, receiver: FakeReceiver) -> None:
    body = bytes(range(256)) * 100
    receiver.cue(Cue(body=body, chunks=7))
    response = await client.request("POST", receiver.url, headers=[], body=b"{}", timeout=5)
    assert response.header("transfer-encoding") == "chunked"
    assert response.body == body


@pytest.mark.parametrize("chunks", [0, 9])
async def test_oversized_body_is_truncated_and_connection_reused(
    kind: str, receiver: FakeReceiver, chunks: int
) -> None:
    body = b"abcdefgh" * 40_000  # 320 KB: several reads
    receiver.cue(Cue(body=body, chunks=chunks))
    client = make_client(kind, max_body=1000)  # type: ignore[arg-type]
    try:
        first = await client.request("GET", receiver.url, headers=[], body=b"", timeout=5)
        second = await client.request("GET", receiver.url, headers=[], body=b"", timeout=5)
    finally:
        await client.aclose()
    assert first.body == body[:1000]
    assert second.body == b'{"ok":true}'
    assert receiver.connections == 1


# --- connections ----------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(client: HttpClient, receiver: FakeReceiver) -> None:
    for i in range(50):
        response = await client.request("POST", receiver.url, headers=[], body=b"%d" % i, timeout=5)
        assert response.status == 200
    assert len(receiver.requests) == 50
    assert receiver.connections == 1


async def test_connection_close_from_server_is_respected(client: HttpClient, receiver: FakeReceiver) -> None:
    receiver.cue(Cue(close=True))
    await get(client, receiver.url)
    await get(client, receiver.url)
    assert receiver.connections == 2
    assert [seen.connection for seen in receiver.requests] == [1, 2]


async def test_idle_connection_closed_by_server_is_retried_on_a_fresh_one(
    client: HttpClient, receiver: FakeReceiver
) -> None:
    await get(client, receiver.url)
    await receiver.close_idle()
    response = await client.request("POST", receiver.url, headers=[], body=b"again", timeout=5)
    assert response.status == 200
    assert receiver.connections == 2
    assert [(seen.body, seen.connection) for seen in receiver.requests] == [(b"", 1), (b"again", 2)]


async def test_stale_retry_happens_once(receiver: FakeReceiver) -> None:
    receiver.cue(Cue(), Cue(drop=True), Cue(drop=True))
    client = LeanClient()
    await get(client, receiver.url)
    with pytest.raises(RetryableDelivery, match=r"connection closed by 127\.0\.0\.1:\d+ before a response"):
        await get(client, receiver.url)
    assert len(receiver.requests) == 3
    assert receiver.connections == 2


async def test_fresh_connection_dropped_is_not_retried(client: HttpClient, receiver: FakeReceiver) -> None:
    receiver.cue(Cue(drop=True))
    with pytest.raises(RetryableDelivery, match=r"127\.0\.0\.1"):
        await get(client, receiver.url)
    assert len(receiver.requests) == 1


async def test_idle_pool_is_capped_per_host(receiver: FakeReceiver) -> None:
    gate = trio.Event()
    receiver.cue(*(Cue(gate=gate) for _ in range(8)))
    client = LeanClient(max_idle_per_host=3)
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(get, client, receiver.url)
        await receiver.wait_until(lambda: len(receiver.requests) == 8)
        assert repr(client) == "<LeanClient [active: 8 | idle: 0 connections to 0 hosts]>"
        gate.set()
    assert receiver.connections == 8
    assert repr(client) == "<LeanClient [active: 0 | idle: 3 connections to 1 host]>"
    await client.aclose()
    assert repr(client) == "<LeanClient [closed]>"
    await receiver.wait_until(lambda: receiver.closed_connections == 8)


def test_make_client_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown HTTP client 'curl'"):
        make_client("curl")  # type: ignore[arg-type]


async def test_httpx_client_repr() -> None:
    client = make_client("httpx", max_connections=7)
    assert repr(client) == "<HttpxClient [max connections: 7]>"
    await client.aclose()
    assert repr(client) == "<HttpxClient [closed]>"


# --- failures -------------------------------------------------------------------------


async def test_hanging_server_times_out_within_the_deadline(
    client: HttpClient, receiver: FakeReceiver
) -> None:
    receiver.cue(Cue(hang=True))
    start = trio.current_time()
    with pytest.raises(RetryableDelivery, match=r"^timed out after 0\.3s$"):
        await client.request("POST", receiver.url, headers=[], body=b"{}", timeout=0.3)
    assert 0.3 <= trio.current_time() - start < 1.0
    await receiver.wait_until(lambda: receiver.closed_connections == 1)


async def test_connection_refused_is_retryable(client: HttpClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableDelivery, match=rf"connection refused to 127\.0\.0\.1:{port}$"):
        await get(client, f"http://127.0.0.1:{port}/")


async def test_unresolvable_host_is_retryable(client: HttpClient) -> None:
    with pytest.raises(RetryableDelivery, match=r"cannot resolve no-such-host\.invalid"):
        await get(client, "http://no-such-host.invalid/")


async def test_garbage_response_is_retryable(client: HttpClient, nursery: trio.Nursery) -> None:
    async def babble(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, babble, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(RetryableDelivery, match=rf"127\.0\.0\.1:{port}"):
        await get(client, f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "not a url", "http:///path", "http://[::1/", "http://example.com:99999/"],
)
async def test_unusable_url_is_permanent(client: HttpClient, url: str) -> None:
    with pytest.raises(PermanentDelivery):
        await get(client, url)


async def test_invalid_header_is_permanent(client: HttpClient, receiver: FakeReceiver) -> None:
    with pytest.raises(PermanentDelivery):
        await client.request("GET", receiver.url, headers=[("X-Bad", "a\r\nb")], body=b"", timeout=5)
    assert receiver.requests == []


async def test_cancellation_propagates_and_closes_the_connection(
    client: HttpClient, receiver: FakeReceiver
) -> None:
    await get(client, receiver.url)  # the hanging request reuses this pooled connection
    receiver.cue(Cue(hang=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(get, client, receiver.url)
        await receiver.wait_until(lambda: len(receiver.requests) == 2)
        nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    await receiver.wait_until(lambda: receiver.closed_connections == 1)
    await get(client, receiver.url)
    assert receiver.connections == 2


async def test_closed_lean_client_refuses_requests(receiver: FakeReceiver) -> None:
    client = LeanClient()
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await get(client, receiver.url)


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (key and cert in one PEM file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    pem = tmp_path_factory.mktemp("tls") / "server.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(pem), "-out", str(pem)],
        check=True, capture_output=True,
    )  # fmt: skip
    return pem


@pytest.fixture
async def tls_receiver(nursery: trio.Nursery, certificate: Path) -> FakeReceiver:
    fake = FakeReceiver(ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    assert fake.ssl_context is not None
    fake.ssl_context.load_cert_chain(certificate)
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    fake.url = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return fake


async def test_https_with_a_trusted_certificate(
    kind: str, tls_receiver: FakeReceiver, certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "lean":
        client: HttpClient = LeanClient(ssl_context=ssl.create_default_context(cafile=certificate))
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # trust_env=True reads it
        client = make_client("httpx")
    try:
        for _ in range(3):
            response = await client.request("POST", tls_receiver.url, headers=[], body=b"{}", timeout=5)
            assert response.status == 200
    finally:
        await client.aclose()
    assert tls_receiver.connections == 1


async def test_https_with_an_untrusted_certificate_is_retryable(
    client: HttpClient, tls_receiver: FakeReceiver
) -> None:
    with pytest.raises(RetryableDelivery, match="certificate"):
        await get(client, tls_receiver.url)
    assert tls_receiver.requests == []


# --- Retry-After ----------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("-5", None),
        ("soon", None),
        ("1e3", None),
        ("9" * 400, None),
        (format_datetime(datetime(2025, 3, 1, 12, 1, 30, tzinfo=UTC), usegmt=True), 90.0),
        ("Sat, 01 Mar 2025 12:00:10 GMT", 10.0),
        ("Sat, 01 Mar 2025 13:00:10 +0100", 10.0),
        ("Sat, 01 Mar 2025 12:00:10 -0000", 10.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),
        ("Sat, 01 Mar 2025 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_defaults_to_the_wall_clock() -> None:
    delay = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")
    assert delay is not None
    assert delay > 365 * 86400
