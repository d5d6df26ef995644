"""The webhook listener's answers: canned heads and bodies, JSON responses, refusals, a lingering close.

Pure parts of `actors.webhook.listener` (no state of its own but the cache of response heads),
kept apart so that module stays readable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

import h11
import msgspec
import trio

from actors.webhook.verify import Unverified
from daemon.telemetry import metrics

Headers = Sequence[tuple[bytes, bytes]]

CHUNK: Final = 64 * 1024
LINGER_SECONDS: Final = 1.0  # after an error, drain the peer briefly so our answer is not lost to a RST
LINGER_BYTES: Final = 1024 * 1024
REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
JSON: Final = (b"content-type", b"application/json")
CLOSE: Final = (b"connection", b"close")
ALLOW_POST: Final = ((b"allow", b"POST"),)
ALLOW_GET: Final = ((b"allow", b"GET, HEAD"),)
RETRY_STORE: Final = ((b"retry-after", b"1"),)
NO_HEADERS: Headers = ()
RETRY_PAUSED: Final = ((b"retry-after", b"5"),)
RETRY_OVERLOADED: Final = ((b"retry-after", b"1"),)
HEALTH_PATHS: Final = (b"/healthz", b"/readyz", b"/metrics")
PROMETHEUS: Final = ((b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),)
REJECTION_REASONS: Final = {  # `ferry.events.rejected{reason}` by status
    400: "malformed_json",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "store_unavailable",
}
encode = msgspec.json.Encoder().encode


def error(message: str) -> bytes:
    return encode({"error": message})


OK: Final = encode({"status": "ok"})
READY: Final = encode({"status": "ready"})
NOT_READY: Final = encode({"status": "not ready"})
TOO_MANY_BODY: Final = error("too many connections")
OVERLOADED: Final = error("overloaded: too many requests waiting for the store, event not accepted; retry")
TOO_MANY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TOO_MANY_BODY), TOO_MANY_BODY)
)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets, empty host for all interfaces) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listener address must be host:port, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_json(content_type: bytes | None) -> bool:
    """`application/json` or `application/*+json`, parameters ignored."""
    if content_type is None:
        return False
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def json_response(conn: h11.Connection, status: int, body: bytes, headers: Headers = ()) -> bytes:
    """The bytes of a whole JSON response."""
    if headers:
        typed = any(name == b"content-type" for name, _ in headers)
        head = [*headers, *(() if typed else (JSON,)), (b"content-length", b"%d" % len(body))]
        response = h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))
    else:
        response = plain_head(status, len(body))
    return conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(END)


@functools.lru_cache(maxsize=256)
def plain_head(status: int, length: int) -> h11.Response:
    """The head of a JSON response without extra headers, built (and validated by h11) once.

    h11 events are immutable, so one serves every connection; building one validates each
    header, which was a tenth of the listener's time per request. Every 202 has the same
    length (event ids have a fixed length), so the cache holds a handful of heads.
    """
    head = [JSON, (b"content-length", b"%d" % length)]
    return h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))


END: Final = h11.EndOfMessage()


Refusal = tuple[int, bytes, Headers]
REPLAYED: Final = Unverified("replayed", "request already received (replay)")


def unauthorized(failure: Unverified) -> bytes:
    return encode({"error": failure.message, "reason": failure.reason})


def header_text(headers: Headers, name: bytes | None) -> str | None:
    """The last non-empty value of header `name` (lower-case), as text, as `_exchange` reads it."""
    found = None
    if name is not None:
        for key, value in headers:
            if key == name and value:
                found = value.decode("latin-1")
    return found


def rejected(source: str, reason: str) -> None:
    """Count a request for `source` answered with an error."""
    metrics.current().events_rejected.add(1, {"source": source, "reason": reason})


async def linger(stream: trio.abc.Stream, seconds: float) -> None:
    """Half-close, then discard what the peer still sends (bounded), so it reads our answer.

    Closing a socket with unread input makes the kernel send a RST, which can destroy
    the response before the client reads it. (A TLS stream cannot half-close: it only drains.)
    """
    with trio.move_on_after(seconds):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        while drained < LINGER_BYTES:
            data = await stream.receive_some(CHUNK)
            if not data:
                return
            drained += len(data)
