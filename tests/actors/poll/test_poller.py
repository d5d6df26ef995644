"""The poller against the fake upstream API: real HTTP on 127.0.0.1, a real SQLite store, trio in process.

Each test waits on an observable condition (the store's rows, the fake's request log) with
a deadline; intervals are a few milliseconds so cycles follow each other quickly.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from actors.poll.config import PollSourceConfig
from actors.poll.listing import PIPELINE
from actors.poll.poller import Poller
from daemon.http.client import Response
from daemon.store.poll import PollState, load_state, save_state
from daemon.store.sqlite import Store
from tests.fake_api import FakeApi

DEADLINE = 20.0


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(records=0, hang_seconds=10).start()
    yield fake
    fake.stop()


def source(url: str, **fields: Any) -> PollSourceConfig:
    raw = {"url": url, "key": ".id", "interval": "10ms", "jitter": 0, "initial_backoff": "10ms"} | fields
    return msgspec.convert(raw, PollSourceConfig, dec_hook=_dec_hook)


def _dec_hook(type_: type, value: Any) -> Any:
    from daemon.config.units import dec_hook

    return dec_hook(type_, value)


@asynccontextmanager
async def polling(store: Store, config: PollSourceConfig, name: str = "api") -> AsyncIterator[Poller]:
    poller = Poller(name, config, store, sinks=["out"], consumers=["out"], dedup_window=86400)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        yield poller
        nursery.cancel_scope.cancel()


async def stored(store: Store, stream: str = "api") -> list[dict[str, Any]]:
    rows = await store.call(
        lambda conn: conn.execute(
            "SELECT payload FROM events WHERE stream = ? ORDER BY seq", (stream,)
        ).fetchall()
    )
    return [json.loads(payload) for (payload,) in rows]


async def state_of(store: Store, name: str = "api") -> PollState:
    return await store.call(lambda conn: load_state(conn, name))


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not await check():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {DEADLINE}s: {what}")


CURSOR = {"items": ".data", "pagination": {"style": "cursor", "path": ".next_cursor"}}
SINCE = {"field": ".updated_at", "param": "updated_since", "overlap": "5s"}


async def test_a_cursor_listing_is_stored_once_then_the_mark_makes_the_next_cycle_a_304(
    store: Store, api: FakeApi
) -> None:
    api.add(450)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR, since=SINCE)
    async with polling(store, config) as poller:

        async def quiet() -> bool:
            return poller.not_modified >= 2

        await until(quiet, "two 304 answers")
        api.add(3)

        async def grown() -> bool:
            return len(await stored(store)) == 453

        await until(grown, "the 3 new records")
    ids = [item["id"] for item in await stored(store)]
    assert ids == list(range(1, 454))
    state = await state_of(store)
    assert state.mark == api.record(453)["updated_at"]
    first = api.snapshot()[0]
    assert "updated_since" not in first.query
    later = [r for r in api.snapshot() if r.query.get("updated_since")]
    assert later
    assert later[0].query["updated_since"] == "2026-01-01T00:00:39Z"  # mark 00:44 minus 5 s
    assert any(r.status == 304 and "if-none-match" in r.headers for r in api.snapshot())
    assert poller.duplicates > 0  # the overlap was asked again and dropped by key


@pytest.mark.parametrize(
    ("style", "query", "paging"),
    [
        ("link", "limit=100", {"style": "link"}),
        ("page", "", {"style": "page", "param": "page", "size_param": "per_page", "size": 100}),
        ("offset", "", {"style": "offset", "size": 100}),
    ],
)
async def test_every_paging_style_reads_every_record_once(
    store: Store, api: FakeApi, style: str, query: str, paging: dict[str, Any]
) -> None:
    api.add(250)
    items = "." if style == "link" else ".data"
    config = source(f"{api.url}/{style}/items?{query}", items=items, pagination=paging)
    async with polling(store, config) as poller:

        async def two_cycles() -> bool:
            return poller.cycles >= 2

        await until(two_cycles, "two complete listings")
    assert [item["id"] for item in await stored(store)] == list(range(1, 251))
    # The second listing's pages were unchanged: 304s, each reusing the next page stored with its
    # validators; with `link` the page that ended the listing is asked in full (its 50 repeats).
    assert poller.not_modified >= (2 if style == "link" else 3)
    assert poller.duplicates >= (50 if style == "link" else 0)


async def test_max_pages_stops_a_cycle_and_the_next_goes_on_from_there(store: Store, api: FakeApi) -> None:
    api.add(500)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR, max_pages=2, interval="200ms")
    async with polling(store, config) as poller:

        async def two_pages() -> bool:
            return len(await stored(store)) >= 200

        await until(two_pages, "the first two pages")
        assert len(await stored(store)) == 200
        assert (await state_of(store)).next_url is not None
        assert poller.cycles == 0

        async def all_pages() -> bool:
            return poller.cycles >= 1

        await until(all_pages, "the listing completed")
    assert [item["id"] for item in await stored(store)] == list(range(1, 501))


async def test_a_repeating_cursor_is_reported_not_looped_on(store: Store, api: FakeApi) -> None:
    api.add(300)
    api.fault("repeat", times=2, path="/cursor")
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    async with polling(store, config) as poller:

        async def reported() -> bool:
            return poller.errors["stuck_cursor"] >= 1

        await until(reported, "a stuck_cursor error")
        assert "cursor stopped advancing" in (poller.last_error or "")

        async def recovered() -> bool:
            return poller.cycles >= 1

        await until(recovered, "a complete listing after the fault")
    assert [item["id"] for item in await stored(store)] == list(range(1, 301))
    assert (await state_of(store)).next_url is None


@pytest.mark.parametrize(
    ("fault", "kind", "message"),
    [
        ("garbage", "not_json", "response is not JSON (application/json)"),
        ("html", "not_json", "response is not JSON (text/html; charset=utf-8)"),
        ("shape", "bad_shape", "`items` must give one array, got null"),
        ("503", "http_503", "HTTP 503"),
        ("close", "transport", "connection closed"),
        ("hang", "timeout", "timed out after 0.3s"),
    ],
)
async def test_a_bad_answer_mid_listing_is_a_counted_error_then_the_listing_resumes(
    store: Store, api: FakeApi, fault: str, kind: str, message: str
) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR, timeout="300ms")
    answered = 0

    def second_page(request: Any) -> None:
        nonlocal answered
        answered += 1
        if answered == 2:
            # A reused connection closed before any answer is retried once on a new one (by design).
            api.fault(fault, times=2 if fault == "close" else 1)

    api.responder = second_page
    async with polling(store, config) as poller:

        async def failed() -> bool:
            return poller.errors[kind] >= 1

        await until(failed, f"a {kind} error")
        assert message in (poller.last_error or ""), poller.last_error
        assert poller.last_error_kind == kind

        async def done() -> bool:
            return poller.last_success_at is not None

        await until(done, "a successful cycle after the fault")
        assert poller.failures == 0
    api.release()
    assert [item["id"] for item in await stored(store)] == list(range(1, 301))


class ScriptedApi:
    """An in-process `HttpClient` for tests on a `MockClock`: answers each request with the next
    of `answers` (the last one for ever after) and writes down when, on trio's clock, it came."""

    def __init__(self, *answers: Response) -> None:
        self._answers = list(answers)
        self.times: list[float] = []
        self.urls: list[str] = []

    async def request(
        self, method: str, url: str, *, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> Response:
        self.times.append(trio.current_time())
        self.urls.append(url)
        return self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]

    async def aclose(self) -> None:
        pass


def on_mock_clock(store: Store, config: PollSourceConfig, api: ScriptedApi, **extra: Any) -> Poller:
    """A poller of `api` whose wall clock is 1.7e9 plus trio's (a MockClock's) time."""
    return Poller(
        "api",
        config,
        store,
        sinks=["out"],
        consumers=["out"],
        dedup_window=86400,
        clock=lambda: 1.7e9 + trio.current_time(),
        connect=lambda _: api,
        **extra,
    )


def page(*ids: int) -> Response:
    return Response(
        200, [("content-type", "application/json")], json.dumps({"data": [{"id": i} for i in ids]}).encode()
    )


async def test_errors_back_off_exponentially_up_to_the_maximum_and_keep_trying(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """On a MockClock the backoff is exact: with the jitter's draw fixed at 0.5, each wait is 3/4 of
    `initial_backoff` doubled per failure, capped at `max_backoff` (waits of minutes, run in no time)."""
    failing = Response(500, [], b"down")
    api = ScriptedApi(*[failing] * 6, page(1, 2, 3))
    config = source(
        "https://api.test/items", items=".data", initial_backoff="20s", max_backoff="80s", interval="1h"
    )
    poller = on_mock_clock(store, config, api, rng=lambda: 0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        while poller.items < 3:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert poller.errors == {"http_500": 6}
    gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(api.times)]
    assert gaps == [15.0, 30.0, 60.0, 60.0, 60.0, 60.0]
    assert [item["id"] for item in await stored(store)] == [1, 2, 3]
    # the page's commit runs on the store's thread, while a MockClock may jump: not before the answer
    last_success_at = poller.status().last_success_at
    assert last_success_at is not None
    assert api.times[-1] <= last_success_at - 1.7e9 <= trio.current_time()


async def test_the_next_cycle_waits_the_interval_on_the_injected_clock(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """An hour's interval passes in no time on a MockClock; the next poll is due an interval after
    the last success, both read from the poller's clock."""
    api = ScriptedApi(page(1))
    config = source("https://api.test/items", items=".data", interval="1h")
    poller = on_mock_clock(store, config, api)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        while poller.cycles < 1:
            await trio.sleep(1)
        assert poller.last_success_at is not None
        assert poller.next_poll_at == poller.last_success_at + 3600
        while len(api.times) < 3:
            await trio.sleep(60)
        nursery.cancel_scope.cancel()
    # each gap is the interval plus the virtual time the cycle's commit took (the clock may jump
    # while the store's thread works): never shorter than the interval
    assert all(later - earlier >= 3600 for earlier, later in itertools.pairwise(api.times)), api.times


async def test_an_item_without_a_key_fails_the_page_and_stores_none_of_it(store: Store, api: FakeApi) -> None:
    api.add(5)
    config = source(f"{api.url}/page/items", items=".data", key=".missing")
    async with polling(store, config) as poller:

        async def failed() -> bool:
            return poller.errors["no_key"] >= 2

        await until(failed, "no_key errors")
    assert "item 0 has no key" in (poller.last_error or "")
    assert await stored(store) == []


JOB = {
    "url": "",
    "method": "POST",
    "body": '{"report": "daily"}',
    "items": "[.result]",
    "key": ".input.report",
}


async def test_a_job_is_submitted_watched_and_its_result_stored(store: Store, api: FakeApi) -> None:
    api.job_polls = 3
    fields = JOB | {"job": {"status_url": ".status_url", "until": '.state == "done"', "interval": "10ms"}}
    config = source(f"{api.url}/jobs", **{k: v for k, v in fields.items() if k != "url"})
    async with polling(store, config) as poller:

        async def done() -> bool:
            return poller.cycles >= 1

        await until(done, "the job's result")
    assert (await stored(store))[0] == {"input": {"report": "daily"}}
    submits = [r for r in api.snapshot() if r.method == "POST"]
    assert submits[0].headers["idempotency-key"] == "api-1"
    assert len([r for r in api.snapshot() if r.path == "/jobs/job-1"]) == 4


async def test_a_job_past_its_timeout_is_a_counted_error_and_nothing_is_invented(
    store: Store, api: FakeApi
) -> None:
    api.job_polls = 10**6
    job = {"until": '.state == "done"', "interval": "10ms", "timeout": "150ms"}
    fields = {k: v for k, v in JOB.items() if k != "url"} | {"job": job}
    config = source(f"{api.url}/jobs", **fields)
    async with polling(store, config) as poller:

        async def timed_out() -> bool:
            return poller.errors["job_timeout"] >= 1

        await until(timed_out, "a job_timeout error")
    assert "not done within 0.15s" in (poller.last_error or "")
    assert await stored(store) == []
    assert (await state_of(store)).job is None or poller.status_name != "backoff"


async def test_a_failed_job_is_a_counted_error(store: Store, api: FakeApi) -> None:
    api.job_polls, api.job_state = 0, "failed"
    job = {"until": '.state == "done"', "fail": '.state == "failed"', "interval": "10ms"}
    config = source(f"{api.url}/jobs", **{k: v for k, v in JOB.items() if k != "url"} | {"job": job})
    async with polling(store, config) as poller:

        async def failed() -> bool:
            return poller.errors["job_failed"] >= 1

        await until(failed, "a job_failed error")
    assert await stored(store) == []


async def test_a_restarted_job_poller_watches_the_stored_job_instead_of_submitting_again(
    store: Store, api: FakeApi
) -> None:
    api.job_polls = 10**6
    job = {"until": '.state == "done"', "interval": "10ms"}
    config = source(f"{api.url}/jobs", **{k: v for k, v in JOB.items() if k != "url"} | {"job": job})
    async with polling(store, config):

        async def watching() -> bool:
            return len([r for r in api.snapshot() if r.method == "GET"]) >= 2

        await until(watching, "the job being watched")
    assert (await state_of(store)).job is not None
    api.job_polls = 0
    async with polling(store, config) as poller:

        async def done() -> bool:
            return poller.cycles >= 1

        await until(done, "the job's result")
    assert len([r for r in api.snapshot() if r.method == "POST"]) == 1
    assert len(await stored(store)) == 1


async def test_a_listing_begun_from_another_url_is_dropped_not_continued(store: Store, api: FakeApi) -> None:
    api.add(120)
    old = PollState(
        mark=None, next_url=f"{api.url}/offset/items?offset=100", cycle_url=f"{api.url}/offset/items"
    )
    await store.call(lambda conn: save_state(conn, "api", old))
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    async with polling(store, config) as poller:

        async def done() -> bool:
            return poller.cycles >= 1

        await until(done, "a complete listing")
    assert all(request.path == "/cursor/items" for request in api.snapshot())
    assert [item["id"] for item in await stored(store)] == list(range(1, 121))


# -- pages read ahead of their commit ----------------------------------------------------------
# The poller sends a page's request before the page in hand is keyed and committed, and a
# committer task stores the pages waiting in order, one store call at a time. These tests hold
# the store's writer thread (a store call that waits on a threading.Event) or fill its "disk"
# (SQLite's page limit, as in tests/daemon/test_app.py) so that a commit is in flight while the
# listing goes on, and check that nothing is lost, repeated or stored out of order.


async def hold_writer(nursery: trio.Nursery, store: Store) -> threading.Event:
    """Block the store's writer thread inside a transaction until the returned event is set."""
    gate, held = threading.Event(), threading.Event()

    def hold(conn: Any) -> None:
        held.set()
        gate.wait(DEADLINE)

    nursery.start_soon(store.call, hold)
    await trio.to_thread.run_sync(held.wait, DEADLINE)
    return gate


def first_request_waits(api: FakeApi) -> threading.Event:
    """The fake's first answer waits for the event (the test holds the writer meanwhile)."""
    go = threading.Event()

    def wait(request: Any) -> None:
        if len(api.snapshot()) == 1:
            go.wait(DEADLINE)

    api.responder = wait
    return go


async def requests_at_least(api: FakeApi, count: int) -> None:
    await trio.to_thread.run_sync(
        lambda: api.wait_for(lambda requests: len(requests) >= count, timeout=DEADLINE)
    )


def cursors(requests: list[Any]) -> list[str | None]:
    return [r.query.get("cursor") for r in requests]


async def test_a_bad_page_after_a_good_one_waits_for_its_commit_and_the_next_cycle_goes_on_from_it(
    store: Store, api: FakeApi
) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    go = first_request_waits(api)
    wait_first = api.responder
    assert wait_first is not None

    def second_page_garbage(request: Any) -> None:
        wait_first(request)
        if len(api.snapshot()) == 2:
            api.fault("garbage")

    api.responder = second_page_garbage
    reported: list[int] = []
    async with polling(store, config) as poller:

        class Seen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage() == "poll failed":
                    reported.append(poller.items)

        handler = Seen()
        logging.getLogger("ferry.poller").addHandler(handler)
        try:
            async with trio.open_nursery() as nursery:
                gate = await hold_writer(nursery, store)
                go.set()
                await requests_at_least(api, 2)  # page 2, garbage, read while page 1's commit waits
                gate.set()

            async def done() -> bool:
                return poller.cycles >= 1

            await until(done, "a complete listing after the bad page")
        finally:
            logging.getLogger("ferry.poller").removeHandler(handler)
        assert poller.errors == {"not_json": 1}
    assert reported == [100]  # the error was reported once page 1 was stored, not before
    requests = api.snapshot()
    # The retry asked for page 2 again with page 1's cursor (not the listing from the start).
    assert cursors(requests)[:3] == [None, requests[1].query["cursor"], requests[1].query["cursor"]]
    assert [item["id"] for item in await stored(store)] == list(range(1, 301))


async def test_a_full_disk_mid_listing_holds_the_listing_and_bounds_the_pages_read_ahead(
    store: Store, api: FakeApi
) -> None:
    api.add(3000)
    config = source(f"{api.url}/cursor/items?limit=10", **CURSOR, since=SINCE, interval="1h")
    opened = threading.Event()

    def fifth_page_waits(request: Any) -> None:
        if sum(r.query.get("cursor") is not None for r in api.snapshot()) >= 4:
            opened.wait(DEADLINE)

    api.responder = fifth_page_waits
    async with polling(store, config) as poller:

        async def four_pages() -> bool:
            return len(await stored(store)) >= 40

        await until(four_pages, "the first four pages")
        pages = await store.call(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        await store.call(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
        opened.set()
        tried = store.commits

        async def failing() -> bool:
            return not store.writable and store.commits >= tried + 4

        await until(failing, "commits failing on the full disk")
        served = len(api.snapshot())
        committed = len(await stored(store)) // 10
        # Each failed commit is tried again (call_until_committed); meanwhile the listing reads
        # at most two batches ahead (the one being committed, the channel) and two pages more.
        assert served - committed <= 2 * PIPELINE + 2, (served, committed)
        await store.call(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))

        async def complete() -> bool:
            return poller.cycles >= 1

        await until(complete, "the listing completed after the disk freed up")
    assert [item["id"] for item in await stored(store)] == list(range(1, 3001))
    state = await state_of(store)
    assert (state.next_url, state.mark) == (None, api.record(3000)["updated_at"])


async def test_a_poller_cancelled_with_pages_read_ahead_is_replaced_without_loss_or_repeat(
    store: Store, api: FakeApi
) -> None:
    # A reload replaces a poll source by cancelling it (daemon.supervisor); its commit in flight lands.
    api.add(1000)
    config = source(f"{api.url}/cursor/items?limit=50", **CURSOR, interval="1h")
    go = first_request_waits(api)
    async with trio.open_nursery() as nursery:
        async with polling(store, config):
            gate = await hold_writer(nursery, store)
            go.set()
            await requests_at_least(api, 5)
        gate.set()  # the commit queued before the cancel still commits
    first = len(api.snapshot())
    assert 0 < len(await stored(store)) < 1000
    async with polling(store, config) as poller:

        async def complete() -> bool:
            return poller.cycles >= 1

        await until(complete, "the replacement's listing")
    assert [item["id"] for item in await stored(store)] == list(range(1, 1001))
    resumed = api.snapshot()[first]
    assert resumed.query.get("cursor") is not None, "the replacement began the listing again"


async def test_a_pause_mid_listing_stops_after_the_listing_with_every_page_read_ahead_stored(
    store: Store, api: FakeApi
) -> None:
    api.add(500)
    config = source(f"{api.url}/cursor/items?limit=50", **CURSOR, interval="1ms")
    go = first_request_waits(api)
    async with polling(store, config) as poller:
        async with trio.open_nursery() as nursery:
            gate = await hold_writer(nursery, store)
            go.set()
            await requests_at_least(api, 3)
            poller.pause()
            gate.set()

        async def paused() -> bool:
            return poller.status_name == "paused"

        await until(paused, "the pause after the cycle under way")
        assert poller.cycles == 1
        served = len(api.snapshot())
    assert served == 10  # the listing's ten pages, then no more requests
    assert [item["id"] for item in await stored(store)] == list(range(1, 501))
    assert (await state_of(store)).next_url is None


async def test_a_page_with_a_bad_item_drops_the_page_asked_for_ahead_of_it(
    store: Store, api: FakeApi
) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)

    def second_page_without_key(request: Any) -> tuple[int, dict[str, str], bytes] | None:
        if len(api.snapshot()) == 2:
            return (
                200,
                {"Content-Type": "application/json"},
                b'{"data": [{"name": "x"}], "next_cursor": "ahead"}',
            )
        return None

    api.responder = second_page_without_key
    async with polling(store, config) as poller:

        async def done() -> bool:
            return poller.cycles >= 1

        await until(done, "a complete listing after the bad item")
        assert poller.errors == {"no_key": 1}
    requests = api.snapshot()
    # The next page's cursor was known before the items were keyed: it was asked for, and its
    # answer dropped with the bad page; the retry asked for page 2 again with page 1's cursor.
    assert "ahead" in cursors(requests)
    retry = next(r for r in requests[2:] if r.query.get("cursor") != "ahead")
    assert retry.query["cursor"] == requests[1].query["cursor"]
    assert [item["id"] for item in await stored(store)] == list(range(1, 301))


async def test_requests_and_items_are_counted_in_the_metrics_by_the_end_of_each_cycle(
    store: Store, api: FakeApi
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from actors.alerting.expr import flatten
    from daemon.telemetry import metrics

    reader = InMemoryMetricReader()
    previous = metrics.current()
    metrics.install(metrics.Metrics(MeterProvider(metric_readers=[reader]).get_meter("test")))
    try:
        api.add(250)
        config = source(f"{api.url}/cursor/items?limit=100", **CURSOR, interval="1h")
        async with polling(store, config) as poller:

            async def counted() -> bool:
                return poller.cycles >= 1 and poller.status_name == "waiting"

            await until(counted, "one listing")
            series = flatten(reader.get_metrics_data())
    finally:
        metrics.install(previous)

    def total(name: str, outcome: str) -> float:
        points = [value for labels, value in series[name] if labels == {"source": "api", "outcome": outcome}]
        return sum(value for value in points if isinstance(value, float))

    assert total("ferry.poll.requests", "ok") == poller.requests == 3
    assert total("ferry.poll.items", "new") == 250
    assert total("ferry.poll.items", "duplicate") == 0


async def test_a_commit_that_fails_ends_the_listing_and_the_next_incarnation_goes_on_from_the_last_commit(
    store: Store, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a full disk (retried, above) but a commit that raises: the poller stops (its supervisor
    # starts a new one in the daemon) and nothing of the failed batch, nor after it, is stored.
    import sqlite3

    from daemon.store import poll as poll_store
    from daemon.store.sqlite_ops import SqliteFunctions

    api.add(1000)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR, since=SINCE, interval="1h")
    real = poll_store.commit_pages
    calls = 0

    def second_call_fails(conn: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            conn.execute(
                "INSERT INTO events(seq, id, stream, payload, received_at) VALUES (1, 'x', 'x', x'', 0)"
            )
        return real(conn, **kwargs)

    monkeypatch.setattr(SqliteFunctions, "commit_pages", staticmethod(second_call_fails))
    go = first_request_waits(api)
    poller = Poller("api", config, store, sinks=["out"], consumers=["out"], dedup_window=86400)
    with pytest.RaisesGroup(sqlite3.IntegrityError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            held = await hold_writer(nursery, store)  # page 1 alone in the first store call
            go.set()
            await requests_at_least(api, 2)
            held.set()
    first = await stored(store)
    assert [item["id"] for item in first] == list(range(1, 101))
    assert (await state_of(store)).pages == 1
    monkeypatch.setattr(SqliteFunctions, "commit_pages", staticmethod(real))
    served = len(api.snapshot())
    async with polling(store, config) as again:

        async def complete() -> bool:
            return again.cycles >= 1

        await until(complete, "the next incarnation's listing")
    assert [item["id"] for item in await stored(store)] == list(range(1, 1001))
    assert api.snapshot()[served].query["cursor"] == api.snapshot()[1].query["cursor"]


async def test_a_fresh_incarnation_inherits_the_pause_and_the_counters_since_start(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """After a crash the supervisor runs a new poller (daemon.assembly): an operator's pause and
    what `ferry ctl status` shows since start carry over; the position is the store's."""
    api = ScriptedApi(Response(503, [], b"down"), page(1, 2))
    config = source("https://api.test/items", items=".data", interval="1h", initial_backoff="1s")

    first = on_mock_clock(store, config, api)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        while first.items < 2:
            await trio.sleep(1)
        first.pause()
        nursery.cancel_scope.cancel()
    second = on_mock_clock(store, config, api)
    second.inherit(first)
    assert second.paused
    per_incarnation = {"state", "next_poll_in_s"}  # `starting`, not yet scheduled

    def shown(poller: Poller) -> dict[str, Any]:
        fields = msgspec.structs.asdict(poller.status())
        return {key: value for key, value in fields.items() if key not in per_incarnation}

    assert shown(second) == shown(first)
    assert (second.items, second.errors, second.requests) == (2, {"http_503": 1}, 2)
