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
    from the stored position; a commit that fails is retried (`Outbox.commit_pages` waits it out)
    while the listing waits, reading at most `PIPELINE` pages more.

Errors:
    A failed request or a page that cannot be read (`PollError`: not JSON, wrong shape, no key,
    HTTP error, timeout) stores nothing of that page; the poller waits `initial_backoff`
    doubling to `max_backoff` with jitter (never less than `Retry-After`) and tries again,
    for ever, at `max_backoff` at worst. A page that names a page already fetched in the
    cycle, or repeats the previous page's items, is a `stuck_cursor` error: its items are
    kept, the listing is abandoned, and the next cycle starts again from the mark.
    Each error is logged, counted (`ferry.poll.errors`) and shown by `ferry ctl status`.

Job mode (`job = {…}`): see `actors.poll.job`.

Pause:
    `ferry ctl pause NAME` stops polling after the cycle under way (a listing's pages so far are
    committed; the next cycle goes on from there); `resume` polls at once. Kept in memory: a
    restart resumes, a reload's replacement keeps the pause.

Cancellation:
    `trio.Cancelled` is never caught. A cancelled commit still commits (see `daemon.store`);
    the next incarnation reads the state back from the store.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import final

import jq
import trio
from opentelemetry import trace

from actors.poll.checks import Checks
from actors.poll.config import LinkPaging, PollSourceConfig
from actors.poll.fetcher import Ahead, Fetcher, where
from actors.poll.job import Batch, JobMode
from actors.poll.pages import (
    Page,
    PageReader,
    PollStatus,
    Watermark,
    first_url,
    link_targets,
    next_url,
    without_params,
)
from actors.poll.progress import advance, dropped_listing
from daemon.errors import PollError
from daemon.http.auth import Auth, build_auth, ssl_context
from daemon.http.client import HttpClient, HttpxClient, LeanClient
from daemon.http.tokens import scrub
from daemon.limits.backoff import ceiling
from daemon.limits.ratelimit import RateLimiter
from daemon.store.api import Outbox
from daemon.store.poll import PageCheck, PollState
from daemon.telemetry import masking, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Record, Taps

log = logging.getLogger("ferry.poller")
PIPELINE = 32
"""Most pages read ahead of their commit (and most pages stored in one store call)."""
READ_AHEAD_BYTES = 8 * 1024**2
"""Most bytes of items read ahead of their commit (one page always goes, however large)."""


@final
class Poller(JobMode):
    """Polls one source; see the module docstring for its guarantees."""

    def __init__(
        self,
        name: str,
        config: PollSourceConfig,
        store: Outbox,
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
        self._auth: Auth | None = (
            build_auth(config.auth, owner=f"sources.{name}", store=store) if config.auth is not None else None
        )
        self._fetcher = Fetcher(name, config, self._auth, limiter)
        self._fetch = self._fetcher.fetch
        self.status_name = "starting"
        self._resumed: trio.Event | None = None  # set while paused; fired by `resume()`
        self._wake = trio.Event()  # cuts the wait before the next cycle short (a resume)
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self.last_success_at: float | None = None
        self.next_poll_at: float | None = None
        self.errors: Counter[str] = Counter()
        self.items = self.duplicates = self.not_modified = self.cycles = 0
        # Counts not yet added to `ferry.poll.requests` / `ferry.poll.items`: an OpenTelemetry
        # `add` costs tens of µs, so they are added at most once a second and after each cycle.
        self._new = self._repeats = 0
        self._counted_at = 0.0
        self._unstored, self._room = 0, trio.Event()  # bytes of items read ahead of their commit

    @property
    def requests(self) -> int:
        """Requests sent (each try of each page, submit or status check)."""
        return self._fetcher.requests

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
        self._state = await self._store.load_poll_state(self.name)
        self._checks = Checks(
            await self._store.load_page_checks(self.name),
            enabled=self._config.conditional,
            horizon=self._dedup_window / 2,
            link=isinstance(self._config.pagination, LinkPaging),
            newest_first=self._config.newest_first,
        )
        begun = self._state.cycle_url
        if self._state.next_url is not None and begun is not None and where(begun) != where(self._config.url):
            # The listing in progress was begun from another `url` (the config changed): its next
            # page would go on reading the old listing. Start over from the mark; keys catch repeats.
            log.info(
                "listing of a previous url dropped",
                extra={"fields": {"source": self.name, "was": where(begun), "now": where(self._config.url)}},
            )
            self._state = dropped_listing(self._state)
        config = self._config
        context = ssl_context(config.tls)
        limit = int(config.max_response) + 1  # one byte more than allowed tells "too large" from "just fits"
        client: HttpClient = (
            LeanClient(max_idle_per_host=2, max_body=limit, ssl_context=context)
            if config.client == "lean"
            else HttpxClient(max_connections=2, max_body=limit, ssl_context=context)
        )
        self._fetcher.client = client
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
        message = scrub(self._redaction.redactor.scrub(message) or message, self._fetcher.sent)
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
            send, receive = trio.open_memory_channel[Batch](PIPELINE)
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
        if self._fetcher.answered:
            current.poll_requests.add(self._fetcher.answered, {"source": self.name, "outcome": "ok"})
        if self._new:
            current.poll_items.add(self._new, {"source": self.name, "outcome": "new"})
        if self._repeats:
            current.poll_items.add(self._repeats, {"source": self.name, "outcome": "duplicate"})
        self._fetcher.answered = self._new = self._repeats = 0

    async def _list(self, pages: trio.MemorySendChannel[Batch]) -> None:
        """Fetch the listing's pages in order, each page's request sent before the page before it
        is keyed, encoded and handed to the committer (see `Ahead`)."""
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
        pages: trio.MemorySendChannel[Batch],
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
                unchanged = self._checks.not_modified(asked, f"{config.method} {where(url)}")
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
                ahead = await Ahead.start(nursery, fetch)
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
            state = advance(
                state, config.since, mark, following, stuck, check, now if unchanged is None else None
            )
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
                    f"cursor stopped advancing: page {number} of this cycle ({where(url)}) {what}; "
                    "listing abandoned, the next cycle starts again from the mark",
                    kind="stuck_cursor",
                )
            if following is None or ahead is None:
                return
            response = await ahead.response()
            url, previous, asked = following, page.keys if unchanged is None else None, ahead_asked

    async def _committer(self, pages: trio.MemoryReceiveChannel[Batch]) -> None:
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

    async def _commit(self, batch: list[Batch]) -> None:
        tracer = telemetry.tracer()
        if tracer is None:
            await self._store_pages(batch, None)
            return
        with tracer.start_as_current_span("poller commit", attributes={"ferry.source": self.name}) as span:
            span.set_attribute("ferry.pages", len(batch))
            await self._store_pages(batch, telemetry.current_traceparent())

    async def _store_pages(self, batch: list[Batch], traceparent: str | None) -> None:
        committed = await self._store.commit_pages(
            self.name,
            [(page.keys, page.items, state) for page, state, _ in batch],
            self._sinks,
            dedup_window=self._dedup_window,
            trace=traceparent,
            checks=[check for _, _, check in batch if check is not None],
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
