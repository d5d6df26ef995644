"""The webhook listener: HTTP/1.1 requests in (h11 on trio streams), events into the store.

A webhook source is served at its path (`POST /hooks/NAME` by default); the listener
also answers `GET /healthz` (alive), `GET /readyz` (ready to take events) and, when given a
`metrics_page`, `GET /metrics` (Prometheus text, rendered per scrape).

Guarantees:

- Acknowledgement: a 2xx is sent only after `ingest` has returned, i.e. after the commit
  that holds the event (or the lookup that found it a duplicate). A failed commit
  answers 503 with `Retry-After`, never 2xx, so the sender keeps the event and retries.
- Backpressure: each connection handles one request at a time and awaits `ingest`
  before it reads the next, so a slow store slows responses instead of queueing work
  in memory. While `overloaded()` says too many requests wait for the store
  (`max_pending`), a request is answered 503 with `Retry-After` at once and nothing
  of it is stored, so accepted requests keep a bounded wait.
- Connections: at most `max_connections`. At the limit a new connection closes the one
  that has waited longest for its client (idle, or sending its head or body slowly;
  see `actors.webhook.connections`), so slow or idle clients cannot lock out prompt ones; only
  when every connection has a request being stored is the new one answered 503.
- Limits: a request head larger than `max_header` gets 431, a body larger than
  `max_body` gets 413 without being read to its end, a head or body that does not
  arrive within `header_timeout` / `body_timeout` gets 408; each then closes the
  connection. An idle keep-alive connection is closed silently after `idle_timeout`.
- Isolation: an error in one request (malformed HTTP, an exception from `ingest`) is
  answered (4xx/5xx) and logged on the `ferry.webhook` logger; it never ends another
  connection or the listener.
- Cancellation: cancelling `run()` closes every connection at once; a request cut off
  before `ingest` returned was never acknowledged, so its sender retries it.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast, final

import h11
import trio

from actors.webhook import answers
from actors.webhook.accept import Ingest, IngestResult, accept
from actors.webhook.config import ListenerConfig
from actors.webhook.connections import ConnectionTable, Slot
from actors.webhook.door import ProtocolErrors, framing_error
from actors.webhook.plain import PlainStream
from actors.webhook.verify import Unverified, Verified, Verifier

__all__ = ["Ingest", "IngestResult", "WebhookListener", "WebhookRoute"]

log = logging.getLogger("ferry.webhook")


@dataclass(frozen=True)
class WebhookRoute:
    """Where a URL path's events go."""

    source: str
    """The webhook source's name."""
    idempotency_header: str | None
    """Header (any case) whose value de-duplicates deliveries of the same webhook, or None."""
    verifier: Verifier | None = None
    """Checks each request's signature or credentials before its body is parsed (`actors.webhook.verify`)."""


_PROTOCOL_LOG_INTERVAL: Final = 10.0  # seconds between two log lines about protocol errors


@dataclass(frozen=True, slots=True)
class _Route:
    source: str
    header: bytes | None  # lower-cased, as h11 reports header names
    verifier: Verifier | None


def _compile(routes: Mapping[str, WebhookRoute]) -> dict[bytes, _Route]:
    return {
        path.encode(): _Route(
            r.source, r.idempotency_header.lower().encode() if r.idempotency_header else None, r.verifier
        )
        for path, r in routes.items()
    }


@final
class WebhookListener:
    """Serves webhook sources over HTTP/1.1 and stores each valid event through `ingest`.

    `routes` maps a URL path to its source. A `POST` with a JSON body (`application/json`
    or `application/*+json`) is passed to `ingest` with the source's idempotency header
    value and the W3C `traceparent` header, and answered `202 {"id": ...}` only once
    `ingest` has returned (`200 {"id": ..., "duplicate": true}` for a repeat). Anything
    else gets a JSON `{"error": ...}` with a specific status: 400, 404, 405, 408, 413, 415,
    431, 500, or 503 (`Retry-After: 1` when the store is unavailable or `overloaded()`,
    `Retry-After: 5` while `paused(source)` is true). One request at a time per connection,
    at most `max_connections` connections (the longest-waiting one makes room for a new
    one): a slow store slows the answers, never grows a queue.

    Timeouts: a connection's first request head must arrive within `header_timeout` of the
    accept; a later one within `header_timeout` of its first byte, after at most
    `idle_timeout` of silence; a body within `body_timeout` of its head. A request cut
    short gets 408 and the connection closes; silence alone closes it without an answer.

    Resource handling: `run()` binds `config.address` (or serves what `listeners()` returns,
    for socket activation: called on every run, since a run closes its listeners), reports the
    bound `(host, port)` pairs through `task_status.started()`, and serves until cancelled;
    cancellation closes every connection and listener.

    Error handling: an exception from one request is answered and logged, never raised out
    of `run()`; `trio.Cancelled` is never caught.
    """

    def __init__(
        self,
        config: ListenerConfig,
        routes: Mapping[str, WebhookRoute],
        ingest: Ingest,
        readiness: Callable[[], bool],
        *,
        paused: Callable[[str], bool] = lambda source: False,
        overloaded: Callable[[], bool] = lambda: False,
        listeners: Callable[[], list[trio.SocketListener]] | None = None,
        metrics_page: Callable[[], bytes | None] | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock
        self._routes = _compile(routes)
        self._ingest = ingest
        self._readiness = readiness
        self._paused = paused
        self._overloaded = overloaded
        self._listeners = listeners
        self._metrics_page = metrics_page
        self._table = ConnectionTable(config.max_connections)
        self._tls = tls
        self._protocol = ProtocolErrors(log, _PROTOCOL_LOG_INTERVAL, trio.current_time)

    def __repr__(self) -> str:
        return (
            f"<WebhookListener {self._config.address} [{len(self._routes)} routes, {len(self._table)} open]>"
        )

    def reroute(self, routes: Mapping[str, WebhookRoute]) -> None:
        """Serve these routes from the next request on (a reload); open connections stay open.

        A request whose path is no longer served by the time its body has arrived gets 404.
        """
        self._routes = _compile(routes)

    def retls(self, context: ssl.SSLContext | None) -> None:
        """Serve new connections with this TLS context (a reload's certificate); open ones keep theirs."""
        self._tls = context

    @property
    def connections(self) -> int:
        """Connections open now (refused ones not counted)."""
        return len(self._table)

    @property
    def evictions(self) -> int:
        """Connections closed, since start, to make room for a new one."""
        return self._table.evictions

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound addresses through `task_status.started()`, serve until cancelled."""
        listeners = self._listeners() if self._listeners is not None else None
        if listeners is None:
            host, port = answers.split_address(self._config.address)
            listeners = await trio.open_tcp_listeners(port, host=host)
        names = [listener.socket.getsockname() for listener in listeners]
        bound = [(str(name[0]), int(name[1])) for name in names]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            log.info("webhook listener serving on %s", ", ".join(f"{h}:{p}" for h, p in bound))
            task_status.started(bound)

    async def _handle(self, stream: trio.SocketStream) -> None:
        tls = self._tls
        with self._table.admit() as slot:
            if slot is None:
                await self._refuse(stream, tls)
                return
            served: trio.abc.Stream = stream if tls is not None else PlainStream(stream)
            try:
                with slot.scope:
                    if tls is not None:
                        served = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
                        if not await self._handshake(served):
                            return
                    await self._serve(served, slot)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went away (or failed the TLS handshake); nothing left to answer
            except Exception as exc:  # counted, one line per interval, no traceback (a peer may cause it)
                self._protocol.note("connection_failed", f"connection failed: {type(exc).__name__}: {exc}")
                log.debug("webhook connection failed", exc_info=True)
            finally:
                await trio.aclose_forcefully(served)

    async def _handshake(self, stream: trio.SSLStream[trio.SocketStream]) -> bool:
        """The TLS handshake, within `header_timeout`; False (close quietly) if it did not finish."""
        with trio.move_on_after(self._config.header_timeout):
            await stream.do_handshake()
            return True
        return False

    async def _refuse(self, stream: trio.SocketStream, tls: ssl.SSLContext | None) -> None:
        if tls is not None:  # a plain-text 503 means nothing to a TLS client: just close
            await trio.aclose_forcefully(stream)
            return
        try:
            await stream.send_all(answers.TOO_MANY)
            await answers.linger(stream, min(answers.LINGER_SECONDS, self._config.header_timeout))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream, slot: Slot) -> None:
        """Answer requests on one connection until it closes, breaks or times out."""
        config = self._config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header)
        deadline, idle = trio.current_time() + config.header_timeout, False
        try:
            while True:
                request = await self._read_head(conn, stream, deadline, idle)
                if request is None or not await self._exchange(conn, stream, request, slot):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # keep-alive is off (Connection: close, HTTP/1.0)
                conn.start_next_cycle()
                slot.waiting()
                deadline, idle = trio.current_time() + config.idle_timeout, True
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                kind, message = "head_too_large", f"request head larger than {config.max_header} bytes"
            elif status == 501:
                kind, message = "unsupported_transfer_encoding", f"not implemented: {exc}"
            else:
                kind, message = "malformed_request", f"malformed HTTP request: {exc}"
            self._protocol.note(kind, message)
            await self._fail(conn, stream, status, message)

    async def _read_head(
        self, conn: h11.Connection, stream: trio.abc.Stream, deadline: float, idle: bool
    ) -> h11.Request | None:
        """The next request's head, or None when the connection should close (EOF, timeout)."""
        while True:
            event = conn.next_event()
            if type(event) is h11.Request:
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            if idle and conn.trailing_data[0]:  # the next request has begun: its head is now timed
                idle, deadline = False, trio.current_time() + self._config.header_timeout
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(answers.CHUNK)
            if scope.cancelled_caught:
                if conn.trailing_data[0]:
                    await self._fail(conn, stream, 408, "timed out receiving the request head")
                return None  # nothing of a request yet: close silently
            conn.receive_data(cast(bytes, data))  # socket and TLS streams both give bytes

    async def _read_body(self, conn: h11.Connection, stream: trio.abc.Stream, keep: bool) -> bytes | None:
        """The request body (b"" if not `keep`), or None once a 413/408 has been sent."""
        limit = self._config.max_body
        parts: list[bytes] = []
        total, deadline = 0, None
        while True:
            event = conn.next_event()
            if type(event) is h11.Data:
                total += len(event.data)
                if total > limit:
                    await self._fail(conn, stream, 413, f"request body larger than {limit} bytes")
                    return None
                if keep:
                    parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(parts)
            elif event is h11.NEED_DATA:
                if deadline is None:
                    deadline = trio.current_time() + self._config.body_timeout
                with trio.move_on_at(deadline) as scope:
                    data = await stream.receive_some(answers.CHUNK)
                if scope.cancelled_caught:
                    await self._fail(conn, stream, 408, "timed out receiving the request body")
                    return None
                conn.receive_data(cast(bytes, data))
            else:
                return None  # h11 reports a body cut short as RemoteProtocolError; nothing else arrives here

    async def _exchange(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request, slot: Slot
    ) -> bool:
        """Read the body and answer one request; False when the connection must close."""
        ambiguous = framing_error(request.headers)
        if ambiguous is not None:  # before h11 reads a body by Transfer-Encoding alone
            self._protocol.note("ambiguous_framing", ambiguous)
            await self._fail(conn, stream, 400, ambiguous)
            return False
        target = request.target
        path = target.partition(b"?")[0] if b"?" in target else target
        route = self._routes.get(path)
        dedup_name = route.header if route is not None else None
        content_type = dedup_key = traceparent = None
        declared, head_size = 0, len(target)
        for name, value in request.headers:
            head_size += len(name) + len(value)
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                declared = int(value)
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == dedup_name and value:
                dedup_key = value.decode("latin-1")
        config = self._config
        if head_size > config.max_header:
            await self._fail(conn, stream, 431, f"request head larger than {config.max_header} bytes")
            return False
        if declared > config.max_body:
            await self._fail(conn, stream, 413, f"request body larger than {config.max_body} bytes")
            return False

        if request.method == b"HEAD":
            return await self._head(conn, stream, path, route is not None)
        refusal: answers.Refusal | None = None
        verified: Verified | None = None
        if route is None:
            refusal = self._other(request.method, path)
        elif request.method != b"POST":
            refusal = (
                405,
                answers.error(f"method {request.method.decode('latin-1')} not allowed"),
                answers.ALLOW_POST,
            )
        elif self._paused(route.source):
            refusal = 503, answers.error(f"source {route.source} is paused"), answers.RETRY_PAUSED
        else:
            verifier = route.verifier
            if verifier is not None and not verifier.needs_body:  # the head decides: before the body
                refusal, verified = _verify(route, request.headers, b"", self._clock())
            if refusal is None and not answers.is_json(content_type):
                got = content_type.decode("latin-1") if content_type else "none"
                refusal = 415, answers.error(f"content type must be application/json, got {got}"), ()

        if conn.they_are_waiting_for_100_continue:
            if refusal is not None:  # answer now rather than read a body we will drop
                await self._fail(conn, stream, refusal[0], body=refusal[1], headers=refusal[2])
                return False
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = await self._read_body(conn, stream, keep=refusal is None)
        if body is None or not slot.busy():
            return False
        if refusal is None and route is not None:
            current = self._routes.get(path)  # a reload may have changed the routes while the body arrived
            if current is None:
                await stream.send_all(answers.json_response(conn, *self._other(request.method, path)))
                return True
            if current is not route:  # verify and de-duplicate by the route now served
                if current.header != route.header:
                    dedup_key = answers.header_text(request.headers, current.header)
                if current.verifier is not route.verifier:
                    verified = None
                route = current
            if route.verifier is not None and verified is None:
                refusal, verified = _verify(
                    route, request.headers, body, self._clock()
                )  # signed: before the body is parsed
        if refusal is not None:
            if route is not None and refusal[0] != 401:  # a 401 was counted with its reason
                answers.rejected(
                    route.source, "paused" if refusal[0] == 503 else answers.REJECTION_REASONS[refusal[0]]
                )
            await stream.send_all(answers.json_response(conn, *refusal))
            return True
        assert route is not None  # every request without a route got a refusal above
        if self._overloaded():
            answers.rejected(route.source, "overloaded")
            await stream.send_all(
                answers.json_response(conn, 503, answers.OVERLOADED, answers.RETRY_OVERLOADED)
            )
            return True
        replay = (verified.replay_key, verified.replay_until) if verified and verified.replay_key else None
        await stream.send_all(
            await accept(
                self._ingest,
                self._config.max_depth,
                conn,
                route.source,
                path,
                body,
                dedup_key,
                traceparent,
                replay,
            )
        )
        return True

    async def _head(self, conn: h11.Connection, stream: trio.abc.Stream, path: bytes, hook: bool) -> bool:
        """Answer a HEAD as its GET would be answered, without the body: 200 for `/healthz` (and
        the rest of `answers.HEALTH_PATHS`), 405 with `Allow: POST` for a webhook path, 404 elsewhere."""
        headers: answers.Headers
        if hook:
            status, body, headers = 405, answers.error("method HEAD not allowed"), answers.ALLOW_POST
        else:
            status, body, headers = self._other(b"GET", path)
        if await self._read_body(conn, stream, keep=False) is None:
            return False
        typed = any(name == b"content-type" for name, _ in headers)
        head = [*headers, *(() if typed else (answers.JSON,)), (b"content-length", b"%d" % len(body))]
        response = h11.Response(status_code=status, headers=head, reason=answers.REASONS.get(status, b""))
        await stream.send_all(
            conn.send(response) + conn.send(answers.END)
        )  # h11 frames a HEAD answer bodiless
        return True

    def _other(self, method: bytes, path: bytes) -> tuple[int, bytes, answers.Headers]:
        """The answer for a path that is not a webhook route."""
        if path not in answers.HEALTH_PATHS:
            return 404, answers.error(f"no webhook at {path.decode('latin-1')}"), ()
        if method != b"GET":
            return 405, answers.error(f"method {method.decode('latin-1')} not allowed"), answers.ALLOW_GET
        if path == b"/healthz":
            return 200, answers.OK, ()
        if path == b"/metrics":
            page = self._metrics_page() if self._metrics_page is not None else None
            if page is None:
                return 404, answers.error("no metrics here: set [telemetry] prometheus = true"), ()
            return 200, page, answers.PROMETHEUS
        return (200, answers.READY, ()) if self._readiness() else (503, answers.NOT_READY, ())

    async def _fail(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        status: int,
        message: str = "",
        *,
        body: bytes | None = None,
        headers: answers.Headers = (),
    ) -> None:
        """Answer an error that ends the connection (if an answer can still be sent), then drain it."""
        if conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE:
            payload = body if body is not None else answers.error(message)
            await stream.send_all(answers.json_response(conn, status, payload, [*headers, answers.CLOSE]))
        await answers.linger(stream, answers.LINGER_SECONDS)


def _verify(
    route: _Route, headers: answers.Headers, body: bytes, now: float
) -> tuple[answers.Refusal | None, Verified | None]:
    """Run the route's verifier at wall time `now`: (None, verified) if the request passes, else
    (401 refusal, None).

    A failure is counted (`ferry.events.rejected{reason}`) here; its answer names the check that
    failed, never a secret or an expected value.
    """
    assert route.verifier is not None
    try:
        return None, route.verifier.check(headers, body, now)
    except Unverified as failure:
        answers.rejected(route.source, failure.reason)
        challenge = route.verifier.challenge
        extra: answers.Headers = ((b"www-authenticate", challenge),) if challenge else ()
        return (401, answers.unauthorized(failure), extra), None
