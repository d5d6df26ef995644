"""The HTTP sink's sender: one JSON request per delivery, or a JSON array per batch
(or `{"ENVELOPE": [...]}` with `batch.envelope`).

Each request carries the delivery id in the idempotency header (stable across
retries and restarts). A batch carries `batch-` + a hash of its delivery ids
instead, plus `Ferry-Batch-Size`; the ids themselves are what a receiver should
de-duplicate on when it needs item-level idempotency.

Outcome classes: 2xx delivered; 408, 425, 429, 5xx and transport errors are
retryable (with the server's `Retry-After`); every other status — other 4xx
and unfollowed 3xx — is permanent and dead-letters the delivery at once.

Auth: `auth` adds its headers (or query parameters) to every request; a 401 makes a token auth
fetch a new token (one request for all the senders that got a 401 with the same token) and the
request is sent once more; a second 401 is a permanent failure like any other 4xx. `url.full`
on spans is the configured URL, never the one carrying an API key.

Failover and rate limit: each request goes to the URL its `SinkGuard` admission chose (the
first of `urls` whose circuit breaker lets it through); the guard also took a permit of the
sink's `rate_limit` budget (a request repeated after a 401 takes another), and every answer
is fed back to that budget (`Retry-After`, `RateLimit-*` pause it for all its users).

Per-item outcomes: with `batch.item_outcomes`, every 2xx answer is read item by item
(`actors.sink.items`): the items it refused come back in `Answer.items`, each with the error
its own status means, and are judged alone; the rest are delivered. An answer that cannot be
read that way (not JSON, the program fails, an item it names is not in the batch) is a
`RetryableDelivery` for the whole batch: nothing it may have refused counts as delivered, and
the items it accepted are sent again under their delivery ids.

Tracing: each request carries the `traceparent` of the attempt's `sink deliver` span (the
span current while `send` runs) and sets its `http.*`/`url.full` attributes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import final
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace

from actors.sink.config import HttpSinkConfig
from actors.sink.guard import SinkGuard, current_url
from actors.sink.items import ItemOutcomes, UnreadableAnswer
from actors.sink.judge import Answer
from daemon.config.url_credentials import redact_url
from daemon.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from daemon.http.auth import Auth, build_auth, credential_values, scrub_error, ssl_context, with_query
from daemon.http.client import HttpClient, HttpxClient, LeanClient, Response, parse_retry_after
from daemon.http.tokens import scrub
from daemon.store.api import Outbox
from daemon.store.outbox import Due
from daemon.telemetry import otel as telemetry

RETRYABLE_STATUSES = frozenset({408, 425, 429})
ANSWER_MAX = 64 * 1024
ITEM_ANSWER_MAX = 16 * 1024 * 1024
"""Bytes of an answer kept: an excerpt's worth, or with `item_outcomes` the whole of any sane one."""
EXCERPT_CHARS = 200


def excerpt_of(body: bytes) -> str:
    """The start of a response body as text: what `ferry ctl event` and the logs show of an answer."""
    return body[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]


def check_status(response: Response) -> int:
    """Return the status of a 2xx response; raise the delivery error any other status means."""
    status = response.status
    if 200 <= status < 300:
        return status
    excerpt = excerpt_of(response.body)
    message = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"
    if status in RETRYABLE_STATUSES or status >= 500:
        raise RetryableDelivery(
            message, status=status, retry_after=parse_retry_after(response.header("retry-after"))
        )
    if 300 <= status < 400:
        message = redirect_message(status, response.header("location"))
    raise PermanentDelivery(message, status=status)


def redirect_message(status: int, location: str | None) -> str:
    """The dead-letter reason of a 3xx: redirects are never followed (docs/reliability.md#redirects).

    Names where the receiver pointed, without the user info or query a URL may carry a secret in.
    """
    if location is None:
        return f"HTTP {status} redirect without a Location (not followed)"
    parts = urlsplit(location.strip())
    netloc = parts.netloc.rpartition("@")[2]
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:EXCERPT_CHARS]
    query = "?…" if parts.query else ""
    return f"HTTP {status} redirect to {shown}{query} (not followed: point the sink's url there)"


def batch_key(batch: Sequence[Due]) -> str:
    """The idempotency key of a batch: the same deliveries in the same order give the same key."""
    digest = hashlib.sha256("\n".join(due.id for due in batch).encode()).hexdigest()
    return f"batch-{digest[:32]}"


@final
class HttpSender:
    """Sends deliveries to `config.url`; see the module docstring."""

    def __init__(
        self,
        name: str,
        config: HttpSinkConfig,
        *,
        guard: SinkGuard | None = None,
        store: Outbox | None = None,
    ) -> None:
        self.name = name
        self._config = config
        self._url = config.targets[0]
        self._limiter = guard.limiter if guard is not None else None
        self._batching = config.batch is not None
        outcomes = config.batch.item_outcomes if config.batch is not None else None
        self._items = ItemOutcomes(outcomes) if outcomes is not None else None
        envelope = config.batch.envelope if config.batch is not None else None
        # `{"inputs": [...]}` around a batch when the API wants an object (HubSpot's batch endpoints).
        self._open = b"{" + json.dumps(envelope).encode() + b":[" if envelope else b"["
        self._close = b"]}" if envelope else b"]"
        context = ssl_context(config.tls)
        # Item outcomes need the whole answer (HubSpot echoes every record written), not an excerpt.
        kept = ITEM_ANSWER_MAX if self._items is not None else ANSWER_MAX
        self._client: HttpClient = (
            LeanClient(max_idle_per_host=config.max_concurrency, ssl_context=context, max_body=kept)
            if config.client == "lean"
            else HttpxClient(max_connections=config.max_concurrency, ssl_context=context, max_body=kept)
        )
        self._auth: Auth | None = (
            build_auth(config.auth, owner=f"sinks.{name}", store=store) if config.auth is not None else None
        )
        # The URL sent carries an api_key query parameter; the configured one (logs, spans) never does.
        self._send_urls = {
            url: with_query(url, self._auth.query) if self._auth is not None else url
            for url in config.targets
        }
        base = [("content-type", "application/json")]
        base.extend((key.lower(), value) for key, value in config.headers.items())
        self._headers = base
        self._key_header = config.idempotency_header

    def __repr__(self) -> str:
        return f"<HttpSender {self.name} {self._config.method} {' | '.join(self._config.targets)}>"

    async def send(self, batch: Sequence[Due]) -> Answer:
        headers = list(self._headers)
        if self._batching:
            body = self._open + b",".join(due.payload for due in batch) + self._close
            headers.append((self._key_header, batch_key(batch)))
            headers.append(("ferry-batch-size", str(len(batch))))
        else:
            body = batch[0].payload
            headers.append((self._key_header, batch[0].id))
        url = current_url() or self._url
        span = trace.get_current_span()
        traceparent = telemetry.current_traceparent()
        if traceparent is not None:
            headers.append(("traceparent", traceparent))
        recording = span.is_recording()
        if recording:
            span.set_attributes({"http.request.method": self._config.method, "url.full": redact_url(url)})
        send_url = self._send_urls[url]
        if self._auth is None:
            response = await self._request(send_url, headers, body)
        else:
            credentials = await self._auth.headers()
            response = await self._request(send_url, [*headers, *credentials.items()], body)
            if response.status == 401 and await self._auth.unauthorized(credentials):
                credentials = await self._auth.headers()
                response = await self._request(send_url, [*headers, *credentials.items()], body, again=True)
        if recording:
            span.set_attribute("http.response.status_code", response.status)
        if self._auth is None:
            status = check_status(response)
            return Answer(status, excerpt_of(response.body) or None, self._refused(status, response, batch))
        # A receiver may echo the credentials it got: none in errors or in the stored answer.
        sent = credential_values(credentials, self._auth.query)
        try:
            status = check_status(response)
            items = self._refused(status, response, batch)
        except DeliveryError as exc:
            raise scrub_error(exc, sent) from None
        if items:
            items = {index: scrub_error(error, sent) for index, error in items.items()}
        return Answer(status, scrub(excerpt_of(response.body), sent) or None, items)

    def _refused(
        self, status: int, response: Response, batch: Sequence[Due]
    ) -> dict[int, DeliveryError] | None:
        """The items a 2xx answer refused (`batch.item_outcomes`); raise when it cannot be read."""
        if self._items is None:
            return None
        try:
            return self._items.read(response.body, [due.payload for due in batch]) or None
        except UnreadableAnswer as exc:
            why = str(exc)
            if len(response.body) >= ITEM_ANSWER_MAX:
                why = f"the answer is larger than the {ITEM_ANSWER_MAX} bytes ferry reads"
            excerpt = excerpt_of(response.body)
            raise RetryableDelivery(
                f"HTTP {status}, but its item outcomes cannot be read ({why}); the whole batch is retried"
                + (f": {excerpt}" if excerpt else ""),
                status=status,
            ) from None

    async def _request(
        self, url: str, headers: list[tuple[str, str]], body: bytes, *, again: bool = False
    ) -> Response:
        """One request, its answer fed back to the rate limit; `again` (after a 401) takes a permit
        first: the guard took the attempt's first one."""
        config, limiter = self._config, self._limiter
        if again and limiter is not None:
            await limiter.acquire(self.name)
        response = await self._client.request(
            config.method, url, headers=headers, body=body, timeout=config.timeout
        )
        if limiter is not None:
            limiter.feedback(response.status, dict(response.headers))
        return response

    async def aclose(self) -> None:
        if self._auth is not None:
            await self._auth.aclose()
        await self._client.aclose()
