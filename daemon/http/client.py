"""Outbound HTTP for ferry's sinks: one small interface, two clients.

A sink holds an `HttpClient`: `request(method, url, headers=…, body=…, timeout=…)`
returns a `Response`; `aclose()` releases its connections.

- `LeanClient` speaks HTTP/1.1 over trio streams (TLS via `trio.SSLStream`), with its own
  small codec (`daemon.http.wire`): ~0.15x of httpx's CPU per request one at a time,
  ~0.08x with 16 tasks, and 1/1.75 of what it cost over h11 (`python -m bench.client_bench`,
  docs/performance.md).
- `HttpxClient` wraps `httpx.AsyncClient` for what the lean one leaves out:
  proxies and CA bundles from the environment (`trust_env`), content decoding.

Both take an `ssl_context` (built by `daemon.http.auth.ssl_context` from a `tls` table: a custom CA
bundle, a client certificate for mTLS); without one, the system's CAs are trusted.

Guarantees, for both:

Timeouts: `timeout` bounds the whole call (connect, TLS handshake, send, reading
the response to its end), not each step: past it, `DeliveryTimeout("timed out
after …s")`.

Errors are translated here: transport failures (refused, reset, DNS, TLS, a
malformed response) raise `RetryableDelivery` with a short message naming the
peer; an unusable URL or request raises `PermanentDelivery`. Status codes are
not interpreted: a 500 is a `Response`, and the sink decides.

Bodies: at most `max_body` bytes are kept; the rest is read and discarded, so
the connection stays reusable.

Connection reuse (LeanClient): idle keep-alive connections are pooled per
(scheme, host, port), at most `max_idle_per_host` each, most recent reused
first; a connection is pooled only after a complete exchange both sides agreed
to keep alive, with no byte after the response (`daemon.http.wire` says how a
response is framed and what it refuses). Connections in use are not capped
here: the caller's concurrency bounds them. A reused connection that fails
before any response byte (the server closed it while idle) is retried once on a
fresh connection, within the same deadline; a server that read the request and closed without answering
thus gets it twice, which the `Idempotency-Key` header makes safe. The lean
client ignores proxy environment variables.

Cancellation: `trio.Cancelled` is never swallowed. A connection in use when its
call is cancelled or times out is closed, never pooled: its state is unknown.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final, Literal, Protocol, final
from urllib.parse import unquote, urlsplit

import httpx
import trio

from daemon.errors import DeliveryTimeout, PermanentDelivery, RetryableDelivery
from daemon.http.wire import BadResponse, InvalidRequest, ResponseParser, check_target, encode_head

USER_AGENT: Final = "ferry/0.1"
_CHUNK: Final = 64 * 1024
_URL_CACHE_SIZE: Final = 256
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_OWN_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response: header names lower-cased, body cut to the client's `max_body`."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


class HttpClient(Protocol):
    """What a sink needs from HTTP: one request at a time per task, many tasks at once."""

    async def request(
        self, method: str, url: str, *, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> Response: ...

    async def aclose(self) -> None: ...


def make_client(kind: Literal["lean", "httpx"], **kwargs: Any) -> HttpClient:
    """The client named by a sink's config; `kwargs` go to its constructor."""
    if kind == "lean":
        return LeanClient(**kwargs)
    if kind == "httpx":
        return HttpxClient(**kwargs)
    raise ValueError(f"unknown HTTP client {kind!r}; expected 'lean' or 'httpx'")


_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: delay-seconds or an HTTP-date.

    None when absent or unparseable (a negative number is unparseable: RFC 9110
    allows digits only); a date in the past gives 0.0. `now` is a Unix time,
    `time.time()` by default.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no claim about local time
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL parsed once: where to connect and what to put in the request line."""

    key: tuple[str, str, int]  # (scheme, host, port): the pool key
    target: str  # path and query
    authority: str  # the Host header
    authorization: str | None  # from user:password@ in the URL

    @property
    def where(self) -> str:
        return f"{self.key[1]}:{self.key[2]}"


def _parse_url(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PermanentDelivery(f"invalid URL: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise PermanentDelivery(f"URL scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise PermanentDelivery("invalid URL: no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        check_target(target)
    except InvalidRequest as exc:
        raise PermanentDelivery(f"invalid request: {exc}") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    key = (parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme])
    return _Target(key, target, parts.netloc.rpartition("@")[2], authorization)


class _PeerClosed(Exception):
    """The server ended the stream before sending a response."""


class _Stale(Exception):
    """A reused connection failed before any response byte: retry on a fresh one."""


_TRANSPORT_ERRORS: Final = (OSError, trio.BrokenResourceError, BadResponse, _PeerClosed)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it groups, was raised from or while handling, breadth first."""
    queue, seen = [exc], set[int]()
    while queue:
        exc = queue.pop(0)
        if id(exc) in seen or len(seen) > 20:
            continue
        seen.add(id(exc))
        yield exc
        if isinstance(exc, BaseExceptionGroup):
            queue.extend(exc.exceptions)
        # Suppressed contexts too: httpcore raises `from None` over the OSError that says why.
        queue.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)


def _describe(exc: BaseException, where: str) -> str:
    """A short reason for a failed exchange with `where` (host:port), from the most telling cause."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate of {where} rejected: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error with {where}: {cause.reason or cause}"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused to {where}"
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return f"connection reset by {where}"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve {where.rpartition(':')[0]}: {cause.strerror}"
        if isinstance(cause, _PeerClosed):
            return f"connection closed by {where} before a response"
        if isinstance(cause, BadResponse):
            return f"bad HTTP response from {where}: {cause}"
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:
            return f"network error with {where}: {cause.strerror}"
    return f"connection to {where} failed: {exc}"


@final
class _Connection:
    __slots__ = ("reused", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reused = False


@final
class LeanClient:
    """HTTP/1.1 over trio streams, with a keep-alive pool per host (see the module doc)."""

    def __init__(
        self,
        *,
        max_idle_per_host: int = 32,
        max_body: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_idle = max_idle_per_host
        self._max_body = max_body
        self._ssl_context = ssl_context
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._active = 0
        self._closed = False

    def __repr__(self) -> str:
        if self._closed:
            return "<LeanClient [closed]>"
        idle = sum(len(pool) for pool in self._idle.values())
        hosts = sum(1 for pool in self._idle.values() if pool)
        return (
            f"<LeanClient [active: {self._active} | idle: {_plural(idle, 'connection')}"
            f" to {_plural(hosts, 'host')}]>"
        )

    async def request(
        self, method: str, url: str, *, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> Response:
        if self._closed:
            raise RuntimeError("LeanClient is closed")
        target = self._targets.get(url)
        if target is None:
            target = _parse_url(url)
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        fields = [("Host", target.authority)]
        if target.authorization is not None:
            fields.append(("Authorization", target.authorization))
        agent = True
        for name, value in headers:
            lower = name.lower()
            if lower == "host":
                fields[0] = (name, value)
            elif lower not in _OWN_HEADERS:
                agent = agent and lower != "user-agent"
                fields.append((name, value))
        if agent:
            fields.append(("User-Agent", USER_AGENT))
        fields.append(("Content-Length", str(len(body))))
        try:
            data = encode_head(method, target.target, fields) + body
        except InvalidRequest as exc:
            raise PermanentDelivery(f"invalid request: {exc}") from None
        head_request = method == "HEAD"
        # trio.fail_after without its generator-based context manager (~5 % of a request's CPU):
        # the scope catches only its own deadline's cancellation; an outer one passes through.
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            pool = self._idle.get(target.key)
            if pool:
                try:
                    return await self._exchange(pool.pop(), target, data, head_request)
                except _Stale:
                    pass
            connection = await self._connect(target)
            return await self._exchange(connection, target, data, head_request)
        raise DeliveryTimeout(f"timed out after {timeout:g}s")

    async def _connect(self, target: _Target) -> _Connection:
        scheme, host, port = target.key
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise RetryableDelivery(_describe(exc, target.where)) from exc
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            # The handshake happens on first send, inside _exchange's error handling.
            stream = trio.SSLStream(stream, self._ssl_context, server_hostname=host, https_compatible=True)
        return _Connection(stream)

    async def _exchange(
        self, connection: _Connection, target: _Target, data: bytes, head_request: bool
    ) -> Response:
        """One request (`data`: head and body) and its response on `connection`, pooled or closed after."""
        stream = connection.stream
        self._active += 1
        received = keep = False
        parser = ResponseParser(head_request=head_request, max_body=self._max_body)
        # Plain TCP is written and read on the socket's descriptor (`_send_all`, `_receive`):
        # SocketStream's wrappers (an error-translating context manager and a conflict detector
        # per call) cost ~5 % of a request's CPU, and trio's socket methods add a trip through the
        # scheduler after every call that did not block; a pooled connection is never shared
        # between tasks. OSError is handled like the stream's BrokenResourceError.
        fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
        try:
            try:
                if fd < 0:
                    await stream.send_all(data)
                else:
                    await _send_all(fd, data)
                while True:
                    incoming = await (stream.receive_some(_CHUNK) if fd < 0 else _receive(fd, received))
                    if not incoming:
                        if not received:
                            raise _PeerClosed
                        parser.eof()
                        break
                    received = True
                    if parser.feed(incoming):
                        break
            except _TRANSPORT_ERRORS as exc:
                if connection.reused and not received:
                    raise _Stale from exc
                raise RetryableDelivery(_describe(exc, target.where)) from exc
            keep = parser.reusable
            return Response(parser.status, parser.headers, parser.body)
        finally:
            self._active -= 1
            pool = self._idle.setdefault(target.key, []) if keep and not self._closed else None
            if pool is not None and len(pool) < self._max_idle:
                connection.reused = True
                pool.append(connection)
            else:
                await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their call ends."""
        self._closed = True
        pools, self._idle = self._idle, {}
        for pool in pools.values():
            for connection in pool:
                await trio.aclose_forcefully(connection.stream)


@final
class HttpxClient:
    """`httpx.AsyncClient` behind the `HttpClient` interface, for proxies and other httpx features."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_body: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._max_body = max_body
        self._client = httpx.AsyncClient(
            trust_env=True,
            verify=ssl_context if ssl_context is not None else True,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def __repr__(self) -> str:
        state = "closed" if self._client.is_closed else f"max connections: {self._max_connections}"
        return f"<HttpxClient [{state}]>"

    async def request(
        self, method: str, url: str, *, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> Response:
        target = _parse_url(url)  # the same URL rules and messages as LeanClient
        try:
            with trio.fail_after(timeout):
                async with self._client.stream(
                    method, url, headers=list(headers), content=body, timeout=timeout
                ) as response:
                    chunks, kept = [], 0
                    async for chunk in response.aiter_bytes():
                        if kept < self._max_body:
                            chunks.append(chunk)
                            kept += len(chunk)
                    content = b"".join(chunks)[: self._max_body]
                    return Response(response.status_code, response.headers.multi_items(), content)
        except (trio.TooSlowError, httpx.TimeoutException):
            raise DeliveryTimeout(f"timed out after {timeout:g}s") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise PermanentDelivery(f"invalid request: {exc}") from None
        except httpx.HTTPError as exc:
            raise RetryableDelivery(_describe(exc, target.where)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


async def _send_all(fd: int, data: bytes) -> None:
    """Write `data` to the non-blocking socket `fd`, waiting only while the kernel's buffer is full.

    No checkpoint when it all fits at once: the request's `_receive` waits next, and that wait
    is the request's checkpoint (cancellation, a turn for other tasks)."""
    try:
        sent = os.write(fd, data)
    except BlockingIOError:  # the buffer is full before a byte fits
        sent = 0
    if sent < len(data):
        with memoryview(data) as view:
            while sent < len(data):
                await trio.lowlevel.wait_writable(fd)
                with contextlib.suppress(BlockingIOError):  # woken, yet no room after all
                    sent += os.write(fd, view[sent:])


async def _receive(fd: int, more: bool) -> bytes:
    """The next bytes of the answer on the non-blocking socket `fd` (b"" at its end).

    The first read of an answer waits for the socket first (right after the request the answer
    cannot be there yet, and the wait is the request's checkpoint); a later one (`more`) reads
    at once and waits only if nothing is there."""
    if more:
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            pass
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            pass


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
