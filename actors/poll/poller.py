"""The poller: one poll source, turning an HTTP API into a stream of events (docs/polling.md).

Delivery:
    Exactly once per item key. Each page's new items, their keys and the poller's position
    (next page, high-water mark, validators) commit in one transaction
    (`daemon.store.poll.commit_page`); an item whose key is already stored is dropped. A
    crash at any point resumes from the last committed page and repeats nothing.

Cycle and pipelining: see `actors.poll.listing` (a listing's pages, read ahead of their commit).

Errors:
    A failed request or a page that cannot be read (`PollError`: not JSON, wrong shape, no key,
    HTTP error, timeout) stores nothing of that page; the poller waits `initial_backoff`
    doubling to `max_backoff` with jitter (never less than `Retry-After`) and tries again,
    for ever, at `max_backoff` at worst. A cursor that stops advancing is a `stuck_cursor`
    error (`actors.poll.listing`).
    Each error is logged, counted (`ferry.poll.errors`) and shown by `ferry ctl status`.

Job mode (`job = {…}`): see `actors.poll.job`.

Clock:
    `clock` is the wall clock (epoch seconds; `time.time` in the daemon) that marks, validators'
    ages, job timeouts, `ferry ctl status` and taps read; waits are on trio's clock. A test hands a
    clock that a `MockClock` moves (and `connect`, an in-process HTTP client), so cycles, backoffs
    and job timeouts run in virtual time.

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
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import final

import jq
import trio

from actors.poll.checks import Checks
from actors.poll.config import LinkPaging, PollSourceConfig
from actors.poll.fetcher import Fetcher, where
from actors.poll.job import JobMode
from actors.poll.listing import Listing
from actors.poll.pages import (
    PageReader,
    PollStatus,
)
from actors.poll.progress import dropped_listing
from daemon.errors import PollError
from daemon.http.auth import Auth, build_auth, ssl_context
from daemon.http.client import HttpClient, HttpxClient, LeanClient
from daemon.http.tokens import scrub
from daemon.limits.backoff import ceiling
from daemon.limits.ratelimit import RateLimiter
from daemon.store.api import Outbox
from daemon.store.poll import PollState
from daemon.telemetry import masking, metrics
from daemon.telemetry.tap import Taps

log = logging.getLogger("ferry.poller")


@final
class Poller(Listing, JobMode):
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
        clock: Callable[[], float] = time.time,
        connect: Callable[[PollSourceConfig], HttpClient] | None = None,
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
        self._clock = clock
        self._connect = connect if connect is not None else http_client
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
        self._counted_at = -math.inf
        self._unstored, self._room = 0, trio.Event()  # bytes of items read ahead of their commit

    @property
    def requests(self) -> int:
        """Requests sent (each try of each page, submit or status check)."""
        return self._fetcher.requests

    def inherit(self, previous: Poller) -> None:
        """Take over what outlives a crash from the incarnation before this one: an operator's
        pause and what `ferry ctl status` shows since start (a restart builds a fresh poller; its
        position is read back from the store)."""
        if previous.paused:
            self._resumed = trio.Event()
        self.failures, self.errors = previous.failures, previous.errors.copy()
        self.last_error, self.last_error_kind = previous.last_error, previous.last_error_kind
        self.last_success_at = previous.last_success_at
        self.items, self.duplicates = previous.items, previous.duplicates
        self.not_modified, self.cycles = previous.not_modified, previous.cycles
        self._fetcher.requests = previous.requests

    def __repr__(self) -> str:
        return (
            f"<Poller {self.name} [{self.status_name}, items: {self.items}, "
            f"duplicates: {self.duplicates}, failures: {self.failures}]>"
        )

    def status(self) -> PollStatus:
        """What `ferry ctl status` shows for this source."""
        now = self._clock()
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
        client = self._connect(config)
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
                    self.last_success_at = self._clock()
                    self.status_name = "waiting"
                    delay = config.interval * (1 + self._rng() * config.jitter)
                self._add_counts()
                gauges[self.name] = self.failures
                self.next_poll_at = self._clock() + delay
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

    def _add_counts(self, *, now: bool = True) -> None:
        clock = trio.current_time()
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


def http_client(config: PollSourceConfig) -> HttpClient:
    """The HTTP client a poller opens for each incarnation (closed when it ends): `config.client`,
    its TLS, and a body limit one byte over `max_response` (which tells "too large" from "just fits")."""
    context = ssl_context(config.tls)
    limit = int(config.max_response) + 1
    if config.client == "lean":
        return LeanClient(max_idle_per_host=2, max_body=limit, ssl_context=context)
    return HttpxClient(max_connections=2, max_body=limit, ssl_context=context)
