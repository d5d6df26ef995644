"""Conditional requests for every page (actors/poll/checks.py) against the fake API: what a 304
saves, and the upstreams that misuse it. Real HTTP on 127.0.0.1, a real SQLite store, trio in process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from actors.poll.config import PollSourceConfig
from actors.poll.poller import Poller
from daemon.store.sqlite import Store
from tests.actors.poll.test_poller import CURSOR, source, state_of, stored, until
from tests.fake_api import ApiRequest, FakeApi


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(records=0, hang_seconds=10).start()
    yield fake
    fake.stop()


@asynccontextmanager
async def polling(
    store: Store, config: PollSourceConfig, *, dedup_window: float = 86400
) -> AsyncIterator[Poller]:
    poller = Poller("api", config, store, sinks=["out"], consumers=["out"], dedup_window=dedup_window)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        yield poller
        nursery.cancel_scope.cancel()


async def rows(store: Store) -> int:
    count: int = await store.call(
        lambda conn: conn.execute("SELECT count(*) FROM poll_pages WHERE source = 'api'").fetchone()[0]
    )
    return count


def first_pages(requests: list[ApiRequest]) -> list[int]:
    """Indexes of the requests that began a cycle (no cursor)."""
    return [n for n, r in enumerate(requests) if "cursor" not in r.query]


async def test_a_304_to_a_request_without_validators_is_an_error_not_the_end_of_the_listing(
    store: Store, api: FakeApi
) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)

    def page_two_blind_304(request: ApiRequest) -> tuple[int, dict[str, str], bytes] | None:
        if len(api.snapshot()) == 2:  # the first listing: nothing was ever asked conditionally
            return 304, {}, b""
        return None

    api.responder = page_two_blind_304
    async with polling(store, config) as poller:

        async def complete() -> bool:
            return poller.cycles >= 1

        await until(complete, "a complete listing after the stray 304")
    assert poller.errors == {"http_304": 1}
    assert "HTTP 304 Not Modified to a request that carried no validator" in (poller.last_error or "")
    assert [item["id"] for item in await stored(store)] == list(range(1, 301))
    retry = api.snapshot()[2]
    assert retry.query["cursor"] == api.snapshot()[1].query["cursor"]  # page 2 asked again, in full
    assert "if-none-match" not in retry.headers


async def test_lost_validators_mean_full_reads_and_a_blind_304_for_such_a_page_is_an_error(
    store: Store, api: FakeApi
) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    async with polling(store, config) as poller:

        async def unchanged() -> bool:
            return poller.not_modified >= 3

        await until(unchanged, "a listing of three 304s")
    assert await rows(store) == 3
    # Restart with the validators gone (an operator deleted them, a restored backup): the next
    # listing asks every page in full, and an upstream answering 304 to such a request anyway
    # (a confused cache in between) is an error, never "nothing new on this page or after it".
    await store.call(lambda conn: conn.execute("DELETE FROM poll_pages"))
    seen = len(api.snapshot())

    def blind_304_once(request: ApiRequest) -> tuple[int, dict[str, str], bytes] | None:
        if len(api.snapshot()) == seen + 2:
            return 304, {"ETag": '"stale"'}, b""
        return None

    api.responder = blind_304_once
    api.add(5)
    async with polling(store, config) as poller:

        async def again() -> bool:
            return poller.cycles >= 1 and poller.not_modified >= 1

        await until(again, "a full listing, then 304s again")
        assert poller.errors == {"http_304": 1}
    after = api.snapshot()[seen:]
    assert all("if-none-match" not in r.headers for r in after[:4])  # no validator known for any page
    assert [item["id"] for item in await stored(store)] == list(range(1, 306))
    assert await rows(store) == 4


async def test_weak_etags_are_sent_back_as_they_came(store: Store, api: FakeApi) -> None:
    api.add(250)
    api.weak_etags = True
    config = source(f"{api.url}/page/items", items=".data", pagination={"style": "page", "size": 100})
    async with polling(store, config) as poller:

        async def unchanged() -> bool:
            return poller.not_modified >= 3

        await until(unchanged, "three 304s")
    conditional = [r for r in api.snapshot() if "if-none-match" in r.headers]
    assert conditional
    assert all(r.headers["if-none-match"].startswith('W/"') and r.status == 304 for r in conditional)
    assert len(await stored(store)) == 250


async def test_an_etag_that_changes_on_every_answer_costs_full_reads_and_loses_nothing(
    store: Store, api: FakeApi
) -> None:
    api.add(300)
    api.etags = "changing"
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    async with polling(store, config) as poller:

        async def three() -> bool:
            return poller.cycles >= 3

        await until(three, "three listings")
        api.add(5)

        async def grown() -> bool:
            return len(await stored(store)) == 305

        await until(grown, "the new records")
    assert poller.not_modified == 0
    assert any("if-none-match" in r.headers for r in api.snapshot())  # sent, never matched
    assert all(r.status == 200 for r in api.snapshot())
    assert [item["id"] for item in await stored(store)] == list(range(1, 306))
    assert await rows(store) == 4  # one row per position, rewritten: bounded by the listing's length


async def test_newest_first_an_unchanged_first_page_ends_the_cycle_and_a_new_record_is_still_read(
    store: Store, api: FakeApi
) -> None:
    api.add(500)
    config = source(f"{api.url}/cursor/items?limit=100&direction=desc", **CURSOR, newest_first=True)
    async with polling(store, config) as poller:

        async def quiet() -> bool:
            return poller.not_modified >= 3

        await until(quiet, "three 304s")
        listing = first_pages(api.snapshot())
        assert listing[:4] == [0, 5, 6, 7]  # five pages once, then one request a cycle
        assert all(r.status == 304 for r in api.snapshot()[5:])
        api.add(3)

        async def grown() -> bool:
            return len(await stored(store)) == 503

        await until(grown, "the new records")
    assert sorted(item["id"] for item in await stored(store)) == list(range(1, 504))
    assert (await state_of(store)).refreshed is not None


async def test_validators_are_trusted_only_while_the_keys_they_stand_for_are_remembered(
    store: Store, api: FakeApi
) -> None:
    # A 304 refreshes no key: a page answered 304 for longer than `[store] dedup_window` would have
    # its items stored again once it changes. Validators are sent only within half the window
    # of the page's last full read, so its keys are refreshed at least that often.
    api.add(50)
    config = source(f"{api.url}/page/items", items=".data", interval="50ms")
    started = time.monotonic()
    async with polling(store, config, dedup_window=1.0) as poller:

        async def refreshed() -> bool:
            requests = api.snapshot()
            late = [r for r in requests if r.monotonic > started + 1.5]
            return poller.not_modified >= 2 and any(r.status == 200 for r in late)

        await until(refreshed, "a full read past half the dedup window")
        api.add(1)

        async def grown() -> bool:
            return len(await stored(store)) >= 51

        await until(grown, "the new record")
    assert [item["id"] for item in await stored(store)] == list(range(1, 52))  # none stored twice


async def test_with_link_paging_the_page_that_ended_the_listing_is_always_read_in_full(
    store: Store, api: FakeApi
) -> None:
    # A server whose ETag covers the body only: the last page, exactly full, gains a `rel="next"`
    # without its body changing. Asked conditionally it would answer 304 and the new page be missed.
    api.add(200)
    api.etags = "body_only"
    config = source(f"{api.url}/link/items?limit=100", items=".", pagination={"style": "link"})
    async with polling(store, config) as poller:

        async def quiet() -> bool:
            return poller.not_modified >= 2

        await until(quiet, "304s for the first page")
        before = len(api.snapshot())
        api.add(1)

        async def grown() -> bool:
            return len(await stored(store)) == 201

        await until(grown, "the record on a new third page")
    # While page 2 ended the listing it was never asked conditionally (once it has a next, it may be).
    second = [r for r in api.snapshot()[:before] if r.query.get("after")]
    assert len(second) >= 2
    assert not any("if-none-match" in r.headers for r in second)
    assert [item["id"] for item in await stored(store)] == list(range(1, 202))


async def test_a_listing_answered_304_page_after_page_writes_nothing(store: Store, api: FakeApi) -> None:
    api.add(300)
    config = source(f"{api.url}/cursor/items?limit=100", **CURSOR)
    async with polling(store, config) as poller:

        async def read() -> bool:
            return poller.cycles >= 1 and poller.status_name == "waiting"

        await until(read, "the first listing")
        state = await state_of(store)
        commits = store.commits  # (each store call counts, the one above too)

        async def idle() -> bool:
            return poller.cycles >= 4

        await until(idle, "three unchanged listings")
        assert store.commits == commits  # no transaction (no fsync) for a listing of 304s
    assert poller.not_modified >= 9
    assert await state_of(store) == state


async def test_without_etags_last_modified_is_sent_once_it_is_a_second_older_than_the_answer(
    store: Store, api: FakeApi
) -> None:
    api.add(250)
    api.etags = "none"
    config = source(f"{api.url}/page/items", items=".data", pagination={"style": "page", "size": 100})
    async with polling(store, config) as poller:

        async def unchanged() -> bool:
            return poller.not_modified >= 3

        await until(unchanged, "304s to If-Modified-Since")
    asked = [r for r in api.snapshot() if "if-modified-since" in r.headers]
    assert asked
    assert all(r.status == 304 for r in asked)
    # Answers given within the second of the last change carried a Last-Modified ferry did not keep.
    first = api.snapshot()[0]
    assert "if-modified-since" not in first.headers
    assert len(await stored(store)) == 250
