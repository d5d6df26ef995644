"""Enrichment: one HTTP lookup per event, its JSON answer merged into the event by jq.

A transform with `enrich` runs it on each batch of input events before anything else
(schema, filter, map, routes see the merged event).

Lookups:
    `GET url`, each `{jq}` placeholder replaced by that expression's value on the event
    (a string or number, percent-encoded). A 2xx JSON answer becomes `$lookup`; 404 and
    410 mean "no such record": `$lookup` is null. 408, 425, 429, 5xx, timeouts and
    transport errors are retried with exponential backoff and full jitter (never sooner
    than `Retry-After`) up to `retry.max_attempts`; then the event is dead-lettered with
    the last error. Other 4xx, an answer that is not JSON, a placeholder that is null or
    not one string/number, and a `merge` that fails or gives other than one value
    dead-letter the event at once, with the reason. One bad event never stops the others.

Cache and single flight:
    Answers are kept per URL for `cache_ttl`, 404/410 for `negative_ttl` (LRU, at most
    `cache_size`), so a burst of events for the same record costs one call. Concurrent
    misses for one URL share one request (and its retries). Failures are not cached.
    The cache lives in memory: a restart starts it empty.

Delivery:
    The transformer commits a batch (outputs, dead letters, cursor) only once every lookup
    of the batch has an answer or has given up. A crash before that (even `kill -9`)
    re-runs the batch: lookups are repeated, nothing is lost or doubled downstream.

Backpressure and timeouts:
    At most `concurrency` lookups of a batch are in flight. Each request is bounded by
    `timeout`; a rate-limit permit (`rate_limit`) and a token request (`auth`) are waited
    for first. A lookup that keeps failing holds its batch — and so its transform's later
    events — for at most its retry budget.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final
from urllib.parse import quote

import jq
import msgspec
import trio

from actors.sink.http import check_status
from daemon.config.sync import PLACEHOLDER, EnrichConfig, merge_program
from daemon.errors import PermanentDelivery, RetryableDelivery
from daemon.http.auth import Auth, build_auth, with_query
from daemon.http.client import HttpClient, LeanClient
from daemon.limits.backoff import full_jitter
from daemon.limits.ratelimit import RateLimiter
from daemon.store.api import Outbox
from daemon.store.outbox import StoredEvent
from daemon.telemetry import metrics

log = logging.getLogger("ferry.enrich")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode
NOT_FOUND = frozenset({404, 410})
MISSING = object()


class LookupFailed(Exception):
    """A lookup gave up; the message is the event's dead-letter reason, `attempts` how many
    requests it made (the dead letter's attempt count)."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


@final
class TtlCache:
    """URL -> answer, each entry with its own expiry; least recently used go first beyond `size`."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size, self._clock = size, clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The live answer for `key`, or `MISSING`."""
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        if entry[0] <= self._clock():
            del self._entries[key]
            return MISSING
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass
class _Flight:
    """One lookup in progress; followers wait for `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    value: Any = MISSING
    error: str | None = None
    attempts: int = 1


@final
class Enricher:
    """Looks up and merges for one transform; see the module docstring."""

    def __init__(
        self,
        name: str,
        config: EnrichConfig,
        *,
        limiter: RateLimiter | None = None,
        client: HttpClient | None = None,
        auth: Auth | None = None,
        store: Outbox | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.name = name
        self._config = config
        self._limiter = limiter
        self._client: HttpClient | None = client
        self._auth = (
            auth
            if auth is not None or config.auth is None
            else build_auth(config.auth, owner=f"transforms.{name}.enrich", store=store)
        )
        self._when = jq.compile(config.when) if config.when is not None else None
        self._parts = PLACEHOLDER.split(config.url)  # text, jq, text, jq, …, text
        self._placeholders = [jq.compile(program) for program in self._parts[1::2]]
        self._merge = jq.compile(merge_program(config.merge))
        self._headers = [("accept", "application/json"), *((k.lower(), v) for k, v in config.headers.items())]
        self._cache = TtlCache(config.cache_size, clock)
        self._flights: dict[str, _Flight] = {}
        self.requests = 0
        self.hits = 0
        self.shared = 0
        self.failed = 0

    def __repr__(self) -> str:
        return (
            f"<Enricher {self.name} [requests: {self.requests}, cache hits: {self.hits}, "
            f"shared: {self.shared}, failed: {self.failed}, cached: {len(self._cache)}]>"
        )

    async def aclose(self) -> None:
        """Close the idle connections; the next lookup opens new ones (the transformer calls this
        when its run ends, so a restarted run starts clean)."""
        client, self._client = self._client, None
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if client is not None:
                await client.aclose()

    async def enrich(
        self, events: Sequence[StoredEvent]
    ) -> tuple[list[StoredEvent], list[tuple[StoredEvent, str, int]]]:
        """(the events, merged, in order; the events dead-lettered with their reasons and the
        number of lookup requests made for each)."""
        urls: list[str | None] = []
        failures: dict[int, tuple[str, int]] = {}
        for index, event in enumerate(events):
            try:
                urls.append(self.url_of(event.payload))
            except LookupFailed as exc:
                urls.append(None)
                failures[index] = (str(exc), exc.attempts)
        answers: dict[int, Any] = {}
        slots = trio.CapacityLimiter(self._config.concurrency)

        async def one(index: int, url: str) -> None:
            async with slots:
                try:
                    answers[index] = await self.lookup(url)
                except LookupFailed as exc:
                    failures[index] = (str(exc), exc.attempts)

        async with trio.open_nursery() as nursery:
            for index, url in enumerate(urls):
                if url is not None and url != "":
                    nursery.start_soon(one, index, url)
        merged: list[StoredEvent] = []
        for index, event in enumerate(events):
            if index in failures:
                continue
            if index not in answers:  # `when` was false: passes through unchanged
                merged.append(event)
                continue
            try:
                merged.append(event._replace(payload=self._merged(event.payload, answers[index])))
            except LookupFailed as exc:
                failures[index] = (str(exc), exc.attempts)
        self.failed += len(failures)
        return merged, [(events[index], *failures[index]) for index in sorted(failures)]

    def url_of(self, payload: bytes) -> str:
        """The lookup URL for one event; "" when `when` says to skip it. Raises `LookupFailed`."""
        try:
            text = payload.decode()
            if self._when is not None and not _truthy(self._when.input_text(text).all()):
                return ""
            parts = list(self._parts)
            for slot, program in enumerate(self._placeholders):
                values = program.input_text(text).all()
                parts[2 * slot + 1] = _segment(self._parts[2 * slot + 1], values)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LookupFailed(f"enrich: jq: {' '.join(str(exc).split())}") from None
        return "".join(parts)

    def _merged(self, payload: bytes, answer: Any) -> bytes:
        document = b'{"event":' + payload + b',"lookup":' + _encode(answer) + b"}"
        try:
            outputs = self._merge.input_text(document.decode()).all()
        except ValueError as exc:
            raise LookupFailed(f"enrich.merge: jq: {' '.join(str(exc).split())}") from None
        if len(outputs) != 1:
            raise LookupFailed(f"enrich.merge gave {len(outputs)} values, expected one")
        return _encode(outputs[0])

    async def lookup(self, url: str) -> Any:
        """The answer for `url` (None for 404/410): cached, shared with a lookup in flight, or fetched."""
        while True:
            cached = self._cache.get(url)
            if cached is not MISSING:
                self.hits += 1
                _count(self.name, "hit")
                return cached
            flight = self._flights.get(url)
            if flight is None:
                break
            self.shared += 1
            _count(self.name, "shared")
            await flight.done.wait()
            if flight.error is not None:
                raise LookupFailed(flight.error, flight.attempts)
            if flight.value is not MISSING:
                return flight.value
            # The leader was cancelled before it had an answer: take over.
        flight = self._flights[url] = _Flight()
        try:
            flight.value = await self._fetch(url)
            return flight.value
        except LookupFailed as exc:
            flight.error, flight.attempts = str(exc), exc.attempts
            raise
        finally:
            del self._flights[url]
            flight.done.set()

    async def _fetch(self, url: str) -> Any:
        """GET `url` with retries; caches and returns the answer, or raises `LookupFailed`."""
        retry = self._config.retry
        for attempt in range(1, retry.max_attempts + 1):
            try:
                return await self._get(url)
            except RetryableDelivery as exc:
                if attempt >= retry.max_attempts:
                    _count(self.name, "error")
                    raise LookupFailed(
                        f"lookup {url} failed after {attempt} attempts: {exc}", attempt
                    ) from None
                wait = full_jitter(
                    attempt, retry.initial_backoff, retry.max_backoff, retry_after=exc.retry_after
                )
                log.warning(
                    "lookup will be retried",
                    extra={
                        "fields": {"transform": self.name, "url": url, "attempt": attempt, "error": str(exc)}
                    },
                )
                await trio.sleep(wait)
            except PermanentDelivery as exc:
                _count(self.name, "error")
                raise LookupFailed(f"lookup {url}: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get(self, url: str) -> Any:
        """One lookup request; raises `RetryableDelivery`/`PermanentDelivery` as a sink would."""
        config = self._config
        self.requests += 1
        _count(self.name, "request")
        if self._limiter is not None:  # a queue for a permit, not a call: no timeout
            await self._limiter.acquire(f"transforms.{self.name}")
        response = await self._request(url)
        if response.status == 401 and self._auth is not None and await self._auth.unauthorized(None):
            response = await self._request(url)
        if response.status in NOT_FOUND:
            self._cache.put(url, None, config.negative_ttl)
            return None
        check_status(response)
        try:
            answer = _decode(response.body)
        except msgspec.DecodeError:
            excerpt = response.body[:80].decode("utf-8", "replace")
            raise PermanentDelivery(f"HTTP {response.status}: answer is not JSON: {excerpt!r}") from None
        self._cache.put(url, answer, config.cache_ttl)
        return answer

    async def _request(self, url: str) -> Any:
        """One GET bounded by `timeout` (a token request is bounded by its own)."""
        if self._client is None:
            self._client = LeanClient(max_idle_per_host=self._config.concurrency)
        headers = list(self._headers)
        send_url = url
        if self._auth is not None:
            headers.extend((await self._auth.headers()).items())
            send_url = with_query(url, self._auth.query)
        response = await self._client.request(
            "GET", send_url, headers=headers, body=b"", timeout=self._config.timeout
        )
        if self._limiter is not None:
            self._limiter.feedback(response.status, dict(response.headers))
        return response


def _truthy(values: list[Any]) -> bool:
    return bool(values) and values[0] is not None and values[0] is not False


def _segment(program: str, values: list[Any]) -> str:
    """One placeholder's value in the URL, percent-encoded; raises `LookupFailed` for anything else."""
    if len(values) != 1:
        raise LookupFailed(f"enrich.url: {{{program}}} gave {len(values)} values, expected one")
    value = values[0]
    if isinstance(value, str):
        return quote(value, safe="")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    shown = _encode(value).decode()[:60]
    raise LookupFailed(f"enrich.url: {{{program}}} is {shown}, expected a string or number")


def _count(transform: str, result: str) -> None:
    metrics.current().lookups.add(1, {"transform": transform, "result": result})
