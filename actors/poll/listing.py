"""Listing mode of a poll source: `Listing` is the poller's part that reads a listing's pages and
commits them (docs/polling.md).

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

Stuck cursors:
    A page that names a page already fetched in the cycle, or repeats the previous page's
    items, is a `stuck_cursor` error: its items are kept, the listing is abandoned, and the next
    cycle starts again from the mark.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

import trio
from opentelemetry import trace

from actors.poll.checks import Checks
from actors.poll.config import LinkPaging, PollSourceConfig
from actors.poll.fetcher import Ahead, where
from actors.poll.job import Batch
from actors.poll.pages import (
    Page,
    PageReader,
    Watermark,
    first_url,
    link_targets,
    next_url,
    without_params,
)
from actors.poll.progress import advance
from daemon.errors import PollError
from daemon.http.auth import Auth
from daemon.http.client import Response
from daemon.store.api import Outbox
from daemon.store.poll import PageCheck, PollState
from daemon.telemetry import metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Record, Taps

PIPELINE = 32
"""Most pages read ahead of their commit (and most pages stored in one store call)."""
READ_AHEAD_BYTES = 8 * 1024**2
"""Most bytes of items read ahead of their commit (one page always goes, however large)."""


class Listing:
    """The listing cycle of `actors.poll.poller.Poller` (which provides these attributes)."""

    name: str
    cycles: int
    items: int
    duplicates: int
    not_modified: int
    _config: PollSourceConfig
    _state: PollState
    _checks: Checks
    _store: Outbox
    _sinks: list[str]
    _consumers: list[str]
    _dedup_window: float
    _headers: list[tuple[str, str]]
    _body: bytes
    _reader: PageReader
    _auth: Auth | None
    _fetch: Callable[..., Awaitable[Response]]
    _clock: Callable[[], float]
    _taps: Taps
    _new: int
    _repeats: int
    _unstored: int
    _room: trio.Event

    def _add_counts(self, *, now: bool = True) -> None:
        raise NotImplementedError

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
        validators, asked = self._checks.headers(state.pages + 1, url, self._clock())
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
            position, now = state.pages + 1, self._clock()
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
            now = self._clock()
            for result in committed:
                for event_id, payload in result.events:
                    self._taps.publish(self.name, Record("source", event_id, payload, now))
