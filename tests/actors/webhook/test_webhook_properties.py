"""Property tests of the webhook listener: whatever arrives on the socket, a specific, well-formed answer.

hypothesis builds requests from methods, targets, header names and values (valid, odd and
invalid), bodies (JSON, near-JSON, binary, other encodings), content types and framings (a right,
wrong or missing Content-Length, chunked). Each goes over a real socket to a real listener; the
client half-closes after sending so that a short body ends in EOF rather than a timeout.

The properties: the listener answers (or, for a connection it is told nothing on, closes), every
answer is HTTP/1.1 with a JSON body, a refusal is one of the documented 4xx with `{"error": str}`,
no 5xx ever (the fake store never fails), the listener keeps serving afterwards, and an event is
stored exactly when the answer was 202.
"""

from __future__ import annotations

import json

import h11
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.actors.webhook.test_webhook import FakeIngest, serve
from tests.depth import examples

REFUSALS = {400, 404, 405, 408, 413, 415, 431}
SETTINGS = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])

token = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~"),
    min_size=1,
    max_size=20,
)
header_value = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.encode),
    st.binary(max_size=40),  # control bytes, CR/LF, non-ASCII
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
body = st.one_of(
    json_value.map(lambda value: json.dumps(value).encode()),
    json_value.map(lambda value: json.dumps(value).encode("utf-16")),
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda text: text.encode("utf-8")),
    st.sampled_from([b"", b"{", b'{"a":', b"[1,2", b"\xff\xfe{}", b"NaN", b"1e999999", b'"\\ud800"']),
)
content_type = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/JSON; charset=utf-8",
            "application/cloudevents+json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/",
            "json",
            "",
        ]
    ),
    header_value,
)
method = st.one_of(
    st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]), token
)
target = st.one_of(
    st.sampled_from(
        [
            "/hooks/demo",
            "/hooks/plain",
            "/hooks/demo?x=1",
            "/hooks/nope",
            "/healthz",
            "/readyz",
            "/",
            "*",
            "/hooks/demo/../demo",
            "http://h/hooks/demo",
            "/hooks/%64emo",
        ]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40).map(
        lambda t: "/" + t
    ),
    st.binary(min_size=1, max_size=20).map(lambda b: "/" + b.decode("latin-1")),
)
framing = st.sampled_from(["length", "short", "long", "none", "chunked", "both"])


def build(
    method: str,
    target: str,
    headers: list[tuple[str, bytes]],
    body: bytes,
    framing: str,
    ctype: str | bytes | None,
    version: str,
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}".encode("latin-1", "replace"), b"Host: test"]
    if ctype is not None:
        lines.append(b"Content-Type: " + (ctype if isinstance(ctype, bytes) else ctype.encode()))
    if framing in ("length", "both"):
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "short":
        lines.append(b"Content-Length: %d" % max(0, len(body) - 3))
    elif framing == "long":
        lines.append(b"Content-Length: %d" % (len(body) + 5))
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    lines.extend(name.encode() + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def first_answer(port: int, data: bytes) -> tuple[h11.Response, bytes] | None:
    """Send `data`, half-close, read until EOF; the first response and its body (None: no answer)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    async with stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the listener answered and closed before reading everything
        with trio.fail_after(10):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
    if not received:
        return None
    client = h11.Connection(h11.CLIENT)
    asked = "HEAD" if data.startswith(b"HEAD ") else "GET"  # a HEAD's answer has no body
    client.send(h11.Request(method=asked, target="/", headers=[("Host", "t")]))
    client.send(h11.EndOfMessage())
    client.receive_data(received)
    response = client.next_event()
    assert isinstance(response, h11.Response), f"not an HTTP response: {received[:200]!r}"
    parts = []
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"truncated response: {received[:300]!r}")
    return response, b"".join(parts)


def check(answer: tuple[h11.Response, bytes] | None, ingest: FakeIngest, calls_before: int) -> None:
    if answer is None:
        assert len(ingest.calls) == calls_before
        return
    response, payload = answer
    status = response.status_code
    assert response.http_version == b"1.1"
    assert status in {200, 202, 503} | REFUSALS, (status, payload)
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/json"
    if not payload and headers[b"content-length"] != b"0":  # the answer to a HEAD: no body
        assert len(ingest.calls) == calls_before
        return
    decoded = json.loads(payload)
    if status >= 400:
        assert set(decoded) == {"error"} or set(decoded) == {"status"}, decoded  # /readyz says not ready
        if "error" in decoded:
            assert isinstance(decoded["error"], str)
            assert decoded["error"]
    stored = len(ingest.calls) - calls_before
    assert stored == (1 if status in (200, 202) and "id" in decoded else 0), (status, decoded)


@given(
    method=method,
    target=target,
    headers=st.lists(st.tuples(token, header_value), max_size=6),
    body=body,
    framing=framing,
    ctype=content_type,
    version=st.sampled_from(["1.1", "1.1", "1.0", "2.0", "0.9", "x"]),
)
@SETTINGS
def test_any_request_gets_a_specific_json_answer_and_the_listener_lives_on(
    method: str,
    target: str,
    headers: list[tuple[str, bytes]],
    body: bytes,
    framing: str,
    ctype: str | bytes | None,
    version: str,
) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            server = await serve(nursery, max_body=256, max_header=2048)
            data = build(method, target, headers, body, framing, ctype, version)
            check(await first_answer(server.port, data), server.ingest, 0)
            # and the listener still serves a polite client
            ok = await first_answer(
                server.port,
                build("POST", "/hooks/demo", [], b'{"ok":1}', "length", "application/json", "1.1"),
            )
            assert ok is not None
            assert ok[0].status_code == 202
            nursery.cancel_scope.cancel()

    trio.run(scenario)


@given(chunks=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
@SETTINGS
def test_a_valid_request_split_anywhere_is_stored_once(chunks: list[bytes]) -> None:
    """The same bytes in arbitrary TCP segments make the same request."""
    payload = b'{"split":"' + b"".join(chunk.hex().encode() for chunk in chunks)[:150] + b'"}'
    data = build("POST", "/hooks/demo", [], payload, "length", "application/json", "1.1")
    cuts = sorted({sum(len(c) for c in chunks[: i + 1]) % len(data) for i in range(len(chunks))})

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            server = await serve(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                start = 0
                for cut in [*cuts, len(data)]:
                    if cut > start:
                        await stream.send_all(data[start:cut])
                        await trio.lowlevel.checkpoint()
                        start = cut
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
            assert received.startswith(b"HTTP/1.1 202 ")
            assert [call.body for call in server.ingest.calls] == [payload]
            nursery.cancel_scope.cancel()

    trio.run(scenario)
