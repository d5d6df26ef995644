"""The poller: one poll source, turning an HTTP API into a stream of events (docs/polling.md).

Delivery:
    Exactly once per item key. Each page's new items, their keys and the poller's position
    (next page, high-water mark, validators) commit in one transaction
    (`daemon.store.poll.commit_page`); an item whose key is already stored is dropped. A
    crash at any point resumes from the last committed page and repeats nothing.

Cycle:
    Every `interval` (plus jitter) the poller lists what is new: the first page carries the
    mark minus `overlap`; then it follows the pages (`link`, `cursor`, `page`, `offset`) to the
    end or to `max_pages` (the next cycle goes on from there). The mark moves only when a
    listing is complete. Each page's request carries the validators of that page's last answer
    (`actors.poll.checks`): a 304 reuses the stored next page and stores nothing of its own (a
    listing of 304s writes nothing); with `newest_first` a 304 for the first page ends the cycle.

Pipelining:
    A page's request goes out as soon as the page before it is decoded (its cursor, links or
    size known), while that page is keyed, encoded and handed to the committer task, which
    stores every page waiting (at most `PIPELINE` pages, `READ_AHEAD_BYTES` of items) in one
    store call, in the order read, one call at a time. A failed page ends the listing only
    after the pages before it are committed; an answer asked for ahead of it is dropped
    unread. A kill loses the pages not yet committed, which the next incarnation fetches again
    from the stored position; a commit that fails is retried (`Store.call_until_committed`)
    while the listing waits, reading at most `PIPELINE` pages more.

Errors:
    A failed request or a page that cannot be read (`PollError`: not JSON, wrong shape, no key,
    HTTP error, timeout) stores nothing of that page; the poller waits `initial_backoff`
    doubling to `max_backoff` with jitter (never less than `Retry-After`) and tries again,
    for ever, at `max_backoff` at worst. A page that names a page already fetched in the
    cycle, or repeats the previous page's items, is a `stuck_cursor` error: its items are
    kept, the listing is abandoned, and the next cycle starts again from the mark.
    Each error is logged, counted (`ferry.poll.errors`) and shown by `ferry ctl status`.

Job mode (`job = {…}`):
    A cycle submits the request (`Idempotency-Key: SOURCE-CYCLE`), stores the status URL,
    then polls it every `job.interval` until `until` holds — the answer is then read like a
    page — or `fail` holds, or `job.timeout` has passed since the submission (counted
    errors). A restart resumes watching the stored job instead of submitting again.

Pause:
    `ferry ctl pause NAME` stops polling after the cycle under way (a listing's pages so far are
    committed; the next cycle goes on from there); `resume` polls at once. Kept in memory: a
    restart resumes, a reload's replacement keeps the pause.

Cancellation:
    `trio.Cancelled` is never caught. A cancelled commit still commits (see `daemon.store`);
    the next incarnation reads the state back from the store.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, final
from urllib.parse import urljoin, urlsplit

import jq
import msgspec
import trio
from opentelemetry import trace

from actors.poll.checks import Checks
from actors.poll.config import LinkPaging, PollSourceConfig
from actors.poll.pages import (
    Page,
    PageReader,
    PollStatus,
    Watermark,
    excerpt,
    first_url,
    link_targets,
    next_url,
    without_params,
)
from daemon.errors import DeliveryError, PollError
from daemon.http.auth import Auth, build_auth, credential_values, ssl_context, with_query
from daemon.http.client import HttpClient, HttpxClient, LeanClient, Response, parse_retry_after
from daemon.http.tokens import scrub
from daemon.limits.backoff import ceiling
from daemon.limits.ratelimit import RateLimiter
from daemon.store.poll import PageCheck, PollState, commit_pages, load_checks, load_state, save_state
from daemon.store.sqlite import Store
from daemon.telemetry import masking, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Record, Taps

log = logging.getLogger("ferry.poller")
PIPELINE = 32
"""Most pages read ahead of their commit (and most pages stored in one store call)."""
READ_AHEAD_BYTES = 8 * 1024**2
"""Most bytes of items read ahead of their commit (one page always goes, however large)."""
_Batch = tuple[Page, PollState, PageCheck | None]
"""A page handed to the committer: its items, the state after it, the validators to store with it."""


def _where(url: str) -> str:
    """A URL without its query (which may hold a key) for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@final
class _Ahead:
    """The request for the next page, sent while the current one is keyed, encoded and committed.

    The next page's URL is known once a page is decoded; its request goes out at once, so the
    upstream's answer time overlaps ferry's work on the page in hand instead of adding to it.
    Nothing is stored from the answer before the page in hand was handed to the committer;
    when that page ends the listing (a bad item, a stuck cursor) the answer is dropped unread.
    """

    def __init__(self) -> None:
        self._done = trio.Event()
        self._sent = False
        self._response: Response | None = None
        self._error: PollError | None = None

    @classmethod
    async def start(cls, nursery: trio.Nursery, fetch: Callable[[], Awaitable[Response]]) -> _Ahead:
        ahead = cls()
        nursery.start_soon(ahead._run, fetch)
        # The task runs without a pause from its start to writing the request: once it has
        # started, the request is out (or waiting for a permit of the rate limit).
        while not ahead._sent:
            await trio.lowlevel.checkpoint()
        return ahead

    async def _run(self, fetch: Callable[[], Awaitable[Response]]) -> None:
        self._sent = True
        try:
            self._response = await fetch()
        except PollError as exc:
            self._error = exc
        finally:
            self._done.set()

    async def response(self) -> Response:
        """The answer, or the `PollError` fetching it raised."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response


@final
class Poller:
    """Polls one source; see the module docstring for its guarantees."""

    def __init__(
        self,
        name: str,
        config: PollSourceConfig,
        store: Store,
        *,
        sinks: list[str],
        consumers: list[str],
        dedup_window: float,
        limiter: RateLimiter | None = None,
        rng: Callable[[], float] = random.random,
        taps: Taps | None = None,
        redaction: masking.Masking | None = None,
    ) -> None:
        self._taps = taps if taps is not None else Taps()
        self._redaction = redaction if redaction is not None else masking.Masking()
        self.name = name
        self._config = config
        self._store = store
        self._sinks = sinks
        self._consumers = consumers
        self._dedup_window = dedup_window
        self._limiter = limiter
        self._rng = rng
        self._reader = PageReader(config)
        job = config.job
        self._until = jq.compile(f"[{job.until}][0] // false") if job else None
        self._fail = jq.compile(f"[{job.fail}][0] // false") if job and job.fail else None
        self._status_url = jq.compile(f"[{job.status_url}][0]") if job and job.status_url else None
        headers = {"accept": "application/json"}
        if config.body is not None:
            headers["content-type"] = "application/json"
        headers.update((key.lower(), value) for key, value in config.headers.items())
        self._headers = list(headers.items())
        self._body = (config.body or "").encode()
        self._state = PollState()
        self._checks = Checks({}, enabled=False, horizon=0, link=False, newest_first=False)
        self._client: HttpClient = LeanClient()
        self._sent: list[str] = []  # the credentials of the last request, scrubbed from its errors
        self._auth: Auth | None = (
            build_auth(config.auth, owner=f"sources.{name}", store=store) if config.auth is not None else None
        )
        self.status_name = "starting"
        self._resumed: trio.Event | None = None  # set while paused; fired by `resume()`
        self._wake = trio.Event()  # cuts the wait before the next cycle short (a resume)
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self.last_success_at: float | None = None
        self.next_poll_at: float | None = None
        self.errors: Counter[str] = Counter()
        self.items = self.duplicates = self.requests = self.not_modified = self.cycles = 0
        # Counts not yet added to `ferry.poll.requests` / `ferry.poll.items`: an OpenTelemetry
        # `add` costs tens of µs, so they are added at most once a second and after each cycle.
        self._answered = self._new = self._repeats = 0
        self._counted_at = 0.0
        self._unstored, self._room = 0, trio.Event()  # bytes of items read ahead of their commit

    def __repr__(self) -> str:
        return (
            f"<Poller {self.name} [{self.status_name}, items: {self.items}, "
            f"duplicates: {self.duplicates}, failures: {self.failures}]>"
        )

    def status(self) -> PollStatus:
        """What `ferry ctl status` shows for this source."""
        now = time.time()
        return PollStatus(
            state=self.status_name,
            mark=self._state.mark,
            listing=self._state.next_url is not None,
            job=self._state.job is not None,
            next_poll_in_s=None if self.next_poll_at is None else round(max(0.0, self.next_poll_at - now), 3),
            failures=self.failures,
            last_error=self.last_error,
            last_error_kind=self.last_error_kind,
            last_success_at=self.last_success_at,
            errors=dict(self.errors),
            items=self.items,
            duplicates=self.duplicates,
            requests=self.requests,
            not_modified=self.not_modified,
            cycles=self.cycles,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._state = await self._store.call_until_committed(partial(load_state, source=self.name))
        self._checks = Checks(
            await self._store.call_until_committed(partial(load_checks, source=self.name)),
            enabled=self._config.conditional,
            horizon=self._dedup_window / 2,
            link=isinstance(self._config.pagination, LinkPaging),
            newest_first=self._config.newest_first,
        )
        begun = self._state.cycle_url
        if (
            self._state.next_url is not None
            and begun is not None
            and _where(begun) != _where(self._config.url)
        ):
            # The listing in progress was begun from another `url` (the config changed): its next
            # page would go on reading the old listing. Start over from the mark; keys catch repeats.
            log.info(
                "listing of a previous url dropped",
                extra={
                    "fields": {"source": self.name, "was": _where(begun), "now": _where(self._config.url)}
                },
            )
            self._state = replace(
                self._state,
                next_url=None,
                cycle_mark=None,
                cycle_url=None,
                cycle_etag=None,
                cycle_last_modified=None,
                cycle_refreshed=None,
                pages=0,
            )
        config = self._config
        context = ssl_context(config.tls)
        limit = int(config.max_response) + 1  # one byte more than allowed tells "too large" from "just fits"
        client: HttpClient = (
            LeanClient(max_idle_per_host=2, max_body=limit, ssl_context=context)
            if config.client == "lean"
            else HttpxClient(max_connections=2, max_body=limit, ssl_context=context)
        )
        self._client = client
        gauges = metrics.current().poll_failures
        gauges[self.name] = 0
        task_status.started()
        try:
            while True:
                while self._resumed is not None:
                    self.status_name, self.next_poll_at = "paused", None
                    await self._resumed.wait()
                self.status_name, self.next_poll_at = "polling", None
                try:
                    await (self._cycle() if config.job is None else self._job_cycle())
                except PollError as exc:
                    delay = self._failed(exc)
                else:
                    self.failures = 0
                    self.last_success_at = time.time()
                    self.status_name = "waiting"
                    delay = config.interval * (1 + self._rng() * config.jitter)
                self._add_counts()
                gauges[self.name] = self.failures
                self.next_poll_at = time.time() + delay
                self._wake = trio.Event()
                with trio.move_on_after(delay):
                    await self._wake.wait()
        finally:
            gauges.pop(self.name, None)
            self._add_counts()
            with trio.CancelScope(shield=True):
                await client.aclose()
                if self._auth is not None:
                    await self._auth.aclose()

    @property
    def paused(self) -> bool:
        return self._resumed is not None

    def pause(self) -> None:
        """Poll no more after the cycle under way (`ferry ctl pause`); kept in memory only."""
        if self._resumed is None:
            self._resumed = trio.Event()
            log.info("poll source paused", extra={"fields": {"source": self.name}})

    def resume(self) -> None:
        """Poll again now (the wait for the next cycle is cut short)."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()
            self._wake.set()
            log.info("poll source resumed", extra={"fields": {"source": self.name}})

    def _failed(self, exc: PollError) -> float:
        """Count and log a failed cycle; the backoff before the next one."""
        config = self._config
        self.failures += 1
        self.status_name = "backoff"
        # An upstream may echo the credentials it refused: none in `ferry ctl status` or the log.
        message = str(exc)
        message = scrub(self._redaction.redactor.scrub(message) or message, self._sent)
        self.last_error, self.last_error_kind = message, exc.kind
        self.errors[exc.kind] += 1
        metrics.current().poll_errors.add(1, {"source": self.name, "error": exc.kind})
        limit = ceiling(self.failures, config.initial_backoff, config.max_backoff)
        delay = limit / 2 + self._rng() * limit / 2
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, config.max_backoff))
        log.warning(
            "poll failed",
            extra={
                "fields": {
                    "source": self.name,
                    "error": message,
                    "kind": exc.kind,
                    "failures": self.failures,
                    "retry_in_s": round(delay, 3),
                }
            },
        )
        return delay

    # -- HTTP ------------------------------------------------------------------------------

    async def _fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> Response:
        """One request (with `auth`, and once more after a 401 that a new token may fix);
        any answer but 2xx or 304 raises `PollError`."""
        recorder = metrics.current().poll_requests
        auth = self._auth
        try:
            if auth is None:
                response = await self._send(method, url, headers, body)
            else:
                url = with_query(url, auth.query)
                credentials = await auth.headers()
                self._sent = credential_values(credentials, auth.query)
                response = await self._send(method, url, [*headers, *credentials.items()], body)
                if response.status == 401 and await auth.unauthorized(credentials):
                    credentials = await auth.headers()
                    self._sent = [*self._sent, *credential_values(credentials, auth.query)]
                    response = await self._send(method, url, [*headers, *credentials.items()], body)
        except DeliveryError as exc:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            kind = "timeout" if str(exc).startswith("timed out") else "transport"
            raise PollError(f"{method} {_where(url)}: {exc}", kind=kind) from None
        status = response.status
        if status == 304:
            recorder.add(1, {"source": self.name, "outcome": "not_modified"})
            return response
        if not 200 <= status < 300:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            text = excerpt(response.body)
            raise PollError(
                f"{method} {_where(url)}: HTTP {status}" + (f": {text}" if text else ""),
                kind=f"http_{status}",
                retry_after=parse_retry_after(response.header("retry-after")),
            )
        if len(response.body) > self._config.max_response:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            raise PollError(
                f"{method} {_where(url)}: response larger than max_response "
                f"({int(self._config.max_response)} bytes)",
                kind="too_large",
            )
        self._answered += 1
        return response

    async def _send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """One request under the rate limit, its answer fed back to it. Raises `DeliveryError`."""
        if self._limiter is not None:
            await self._limiter.acquire(self.name)
        self.requests += 1
        response = await self._client.request(
            method, url, headers=headers, body=body, timeout=self._config.timeout
        )
        if self._limiter is not None:
            self._limiter.feedback(response.status, dict(response.headers))
        return response

    # -- listing ---------------------------------------------------------------------------

    async def _cycle(self) -> None:
        """One listing (or its next `max_pages` pages); see "Cycle" in the module docstring.

        Pages are fetched while earlier ones commit: a committer task takes every page waiting
        (at most `PIPELINE`, `READ_AHEAD_BYTES`) and stores them in order in one store call, so a
        fast API is not held to one fsync per page and the pages still commit in the order they
        were read. One store call at a time: when it fails the committer raises, the listing is
        cancelled, and the next incarnation (see `daemon.supervisor`) reads the state back.
        """
        self._unstored, self._room = 0, trio.Event()
        error: PollError | None = None
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[_Batch](PIPELINE)
            nursery.start_soon(self._committer, receive)
            async with send:
                try:
                    await self._list(send)
                except PollError as exc:
                    error = exc  # the pages already read still commit first
        if error is not None:
            raise error

    def _add_counts(self, *, now: bool = True) -> None:
        clock = time.monotonic()
        if not now and clock - self._counted_at < 1.0:
            return
        self._counted_at = clock
        current = metrics.current()
        if self._answered:
            current.poll_requests.add(self._answered, {"source": self.name, "outcome": "ok"})
        if self._new:
            current.poll_items.add(self._new, {"source": self.name, "outcome": "new"})
        if self._repeats:
            current.poll_items.add(self._repeats, {"source": self.name, "outcome": "duplicate"})
        self._answered = self._new = self._repeats = 0

    async def _list(self, pages: trio.MemorySendChannel[_Batch]) -> None:
        """Fetch the listing's pages in order, each page's request sent before the page before it
        is keyed, encoded and handed to the committer (see `_Ahead`)."""
        config = self._config
        state = self._state
        since = config.since
        if state.next_url is not None:
            url = state.next_url
        else:
            mark = Watermark.parse(state.mark, since.format) if since and state.mark else None
            start = (
                mark.minus(since.overlap, since.format)
                if since and mark
                else (since.initial if since else None)
            )
            url = first_url(config, start)
            state = replace(state, cycle_mark=state.mark, cycle_url=url, pages=0, cycle_refreshed=None)
        validators, asked = self._checks.headers(state.pages + 1, url, time.time())
        error: PollError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._pages(nursery, pages, url, [*self._headers, *validators], asked, state)
            except PollError as exc:
                error = exc  # raised outside the nursery, not wrapped in an exception group
            finally:
                nursery.cancel_scope.cancel()  # a request sent ahead of a page that ended the listing
        if error is not None:
            raise error

    async def _pages(
        self,
        nursery: trio.Nursery,
        pages: trio.MemorySendChannel[_Batch],
        url: str,
        headers: list[tuple[str, str]],
        asked: PageCheck | None,
        state: PollState,
    ) -> None:
        """The pages from `url` (asked with `headers`, the validators of `asked`); see `_list`."""
        config = self._config
        since = config.since
        fetched: set[str] = set()
        previous: list[str] | None = None
        read = False  # a page of this cycle was read in full (or must be committed)
        response = await self._fetch(config.method, url, headers, self._body)
        for number in range(1, config.max_pages + 1):
            position, now = state.pages + 1, time.time()
            unchanged = None
            if response.status == 304:
                unchanged = self._checks.not_modified(asked, f"{config.method} {_where(url)}")
                self.not_modified += 1
                if position == 1 and self._checks.may_stop(unchanged, self._state, now):
                    self.cycles += 1  # newest first: the whole listing is as it was; nothing to store
                    return
                following, opened = unchanged.next_url, None
            else:
                opened = self._reader.open(response.body, response.header("content-type"))
                links = {}
                if isinstance(config.pagination, LinkPaging):
                    values = [value for name, value in response.headers if name.lower() == "link"]
                    links = link_targets(values, url)
                following = next_url(config.pagination, url, opened, links)
                if following is not None and self._auth is not None and self._auth.query:
                    following = without_params(following, set(self._auth.query))  # never store a key
            fetched.add(url)
            repeated = following is not None and following in fetched
            ahead = ahead_asked = None
            if following is not None and not repeated and number < config.max_pages:
                validators, ahead_asked = self._checks.headers(position + 1, following, now)
                fetch = partial(
                    self._fetch, config.method, following, [*self._headers, *validators], self._body
                )
                ahead = await _Ahead.start(nursery, fetch)
            if opened is None:
                assert unchanged is not None
                page = Page([], [], [unchanged.mark] if unchanged.mark is not None else [], None)
            else:
                page = self._reader.finish(opened)
            stuck = repeated or (following is not None and bool(previous) and page.keys == previous)
            mark = Watermark.highest(page.marks, since.format, None) if since is not None else None
            check = unchanged
            if unchanged is None and not stuck:
                check = self._checks.read(position, url, response, following, mark and mark.text, now)
            state = self._advance(state, mark, following, stuck, check, now if unchanged is None else None)
            if unchanged is not None and not stuck and following is None and position == number and not read:
                self.cycles += 1  # every page of the listing answered 304: nothing to store
                return
            if unchanged is not None and not stuck and following is not None and ahead is not None:
                # Nothing of its own to store: its position goes with the next page's commit.
                response = await ahead.response()
                url, previous, asked = following, None, ahead_asked
                continue
            read = True
            size = sum(map(len, page.items))
            while self._unstored and self._unstored + size > READ_AHEAD_BYTES:
                self._room = trio.Event()
                await self._room.wait()
            self._unstored += size
            await pages.send((page, state, None if unchanged is not None else check))
            if stuck:
                what = (
                    "names a page already fetched in this cycle"
                    if repeated
                    else "repeats the items of the last"
                )
                raise PollError(
                    f"cursor stopped advancing: page {number} of this cycle ({_where(url)}) {what}; "
                    "listing abandoned, the next cycle starts again from the mark",
                    kind="stuck_cursor",
                )
            if following is None or ahead is None:
                return
            response = await ahead.response()
            url, previous, asked = following, page.keys if unchanged is None else None, ahead_asked

    async def _committer(self, pages: trio.MemoryReceiveChannel[_Batch]) -> None:
        """Commit pages in the order they come, all those waiting in one store call."""
        async with pages:
            async for first in pages:
                batch = [first]
                while len(batch) < PIPELINE:
                    try:
                        batch.append(pages.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)
                self._unstored -= sum(len(item) for page, _, _ in batch for item in page.items)
                self._room.set()

    def _advance(
        self,
        state: PollState,
        mark: Watermark | None,
        following: str | None,
        stuck: bool,
        check: PageCheck | None,
        refreshed: float | None,
    ) -> PollState:
        """The state to commit with a page whose items' highest mark is `mark`, whose validators
        are in `check`, read in full at `refreshed` (None: a 304, read in full at `check`'s time)."""
        since = self._config.since
        state = replace(state, pages=state.pages + 1, next_url=following)
        if state.pages == 1:
            state.cycle_etag = check.etag if check is not None else None
            state.cycle_last_modified = check.last_modified if check is not None else None
        if refreshed is None:
            assert check is not None
            refreshed = check.refreshed_at
        if state.cycle_refreshed is None or refreshed < state.cycle_refreshed:
            state.cycle_refreshed = refreshed
        if since is not None and mark is not None:
            current = Watermark.parse(state.cycle_mark, since.format) if state.cycle_mark else None
            if current is None or mark.order > current.order:
                state.cycle_mark = mark.text
        if following is None or stuck:
            state.next_url = None
            if not stuck:
                state.mark = state.cycle_mark
                state.cycles += 1
                # The first page's validators and the oldest full read of any page of this
                # listing: what lets a 304 for that first page end a cycle (`newest_first`).
                state.etag, state.last_modified = state.cycle_etag, state.cycle_last_modified
                state.validated_url, state.refreshed = state.cycle_url, state.cycle_refreshed
            state.cycle_mark = state.cycle_etag = state.cycle_last_modified = state.cycle_url = None
            state.cycle_refreshed = None
            state.pages = 0
        return state

    async def _commit(self, batch: list[_Batch]) -> None:
        tracer = telemetry.tracer()
        if tracer is None:
            await self._store_pages(batch, None)
            return
        with tracer.start_as_current_span("poller commit", attributes={"ferry.source": self.name}) as span:
            span.set_attribute("ferry.pages", len(batch))
            await self._store_pages(batch, telemetry.current_traceparent())

    async def _store_pages(self, batch: list[_Batch], traceparent: str | None) -> None:
        committed = await self._store.call_until_committed(
            partial(
                commit_pages,
                source=self.name,
                pages=[(page.keys, page.items, state) for page, state, _ in batch],
                sinks=self._sinks,
                dedup_window=self._dedup_window,
                trace=traceparent,
                checks=[check for _, _, check in batch if check is not None],
            ),
            wake=self._consumers,
        )
        state = batch[-1][1]
        self.cycles += state.cycles - self._state.cycles  # listings (or jobs) completed by this batch
        self._state = state
        new = sum(len(c.events) for c in committed)
        duplicates = sum(c.duplicates for c in committed)
        self.items += new
        self.duplicates += duplicates
        metrics.current().received[self.name] += new
        self._new += new
        self._repeats += duplicates
        self._add_counts(now=False)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"ferry.new": new, "ferry.duplicates": duplicates})
        if self.name in self._taps.taps:
            now = time.time()
            for result in committed:
                for event_id, payload in result.events:
                    self._taps.publish(self.name, Record("source", event_id, payload, now))

    # -- job mode --------------------------------------------------------------------------

    async def _job_cycle(self) -> None:
        """Submit a job (unless one is stored), watch it, store its result; see "Job mode"."""
        config = self._config
        job = config.job
        assert job is not None
        if self._state.job is None:
            await self._submit()
        watched = json.loads(self._state.job or "{}")
        status_url, submitted_at = str(watched["status_url"]), float(watched["submitted_at"])
        while True:
            if time.time() - submitted_at > job.timeout:
                await self._forget_job()
                raise PollError(
                    f"job {_where(status_url)} not done within {job.timeout:g}s of its submission; given up",
                    kind="job_timeout",
                )
            self.status_name = "job"
            response = await self._fetch("GET", status_url, list(self._headers))
            answer = self._decode(response)
            if self._fail is not None and self._holds(self._fail, answer, "job.fail"):
                await self._forget_job()
                raise PollError(
                    f"job {_where(status_url)} failed: {excerpt(response.body)}", kind="job_failed"
                )
            if self._holds(self._until, answer, "job.until"):
                page = self._reader.read(response.body, response.header("content-type"))
                state = replace(self._state, job=None, cycles=self._state.cycles + 1)
                await self._commit([(page, state, None)])
                return
            await trio.sleep(job.interval)

    async def _submit(self) -> None:
        config = self._config
        headers = [*self._headers, ("idempotency-key", f"{self.name}-{self._state.cycles + 1}")]
        response = await self._fetch(config.method, config.url, headers, self._body)
        if self._status_url is not None:
            try:
                (target,) = self._status_url.input_value(self._decode(response)).all()
            except ValueError as exc:
                raise PollError(f"job.status_url: jq failed on the submit answer: {exc}", kind="jq") from None
        else:
            target = response.header("location")
        if not isinstance(target, str) or not target:
            raise PollError(
                f"no status URL in the submit answer (job.status_url gave {target!r}): "
                + excerpt(response.body),
                kind="bad_shape",
            )
        job = json.dumps({"status_url": urljoin(config.url, target), "submitted_at": time.time()})
        state = replace(self._state, job=job)
        await self._store.call_until_committed(partial(save_state, source=self.name, state=state))
        self._state = state

    async def _forget_job(self) -> None:
        state = replace(self._state, job=None, cycles=self._state.cycles + 1)
        await self._store.call_until_committed(partial(save_state, source=self.name, state=state))
        self._state = state

    @staticmethod
    def _decode(response: Response) -> Any:
        try:
            return msgspec.json.decode(response.body)
        except msgspec.DecodeError as exc:
            kind = response.header("content-type") or "no content-type"
            raise PollError(
                f"response is not JSON ({kind}): {exc}: {excerpt(response.body)!r}", kind="not_json"
            ) from None

    @staticmethod
    def _holds(program: Any, answer: Any, key: str) -> bool:
        try:
            (value,) = program.input_value(answer).all()
        except ValueError as exc:
            raise PollError(f"{key}: jq failed on the status answer: {exc}", kind="jq") from None
        return value is not False and value is not None
