"""The sink's fetcher: how often it asks the store when the next row comes due, and that every
row scheduled for later is still sent once its time comes (a real store, a fake sender)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from actors.sink.sink import Sink
from daemon.errors import RetryableDelivery
from daemon.store.schema import DELIVERED
from daemon.store.sqlite import Connection, Store
from tests.actors.sink.test_sink import RETRY, FakeSender, ingest, real_time_until, rows, settled, until


class Counting:
    """The store, counting the `next_due_after` requests made through it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.next_due_asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def next_due_after(self, stage: str, now: float) -> float | None:
        self.next_due_asked += 1
        return await self._store.next_due_after(stage, now)


async def test_idle_rounds_ask_the_store_for_the_next_due_time_once(store: Store) -> None:
    counting = Counting(store)
    sender = FakeSender()
    sink = Sink("crm", counting, lambda: sender, retry=RETRY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for name in "abcdefgh":  # one at a time: each is a fetch round that ends idle
            await ingest(store, name)
            await until(store, settled(name))
        sink.stop()

    assert sink.delivered == 8
    assert counting.next_due_asked == 1  # at the first idle round; nothing was scheduled later since


async def test_a_retry_it_scheduled_is_asked_for_again_only_once_due(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """The sink's own retry is the next due time it keeps; the store is asked again only when that
    time has come (another row may be scheduled after it)."""
    counting = Counting(store)
    sender = FakeSender(failures={"a": [RetryableDelivery("HTTP 503", status=503, retry_after=600)]})
    clock = lambda: time.time() + trio.current_time()  # noqa: E731
    sink = Sink("crm", counting, lambda: sender, retry=RETRY, clock=clock)
    await ingest(store, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await real_time_until(lambda: sink.retried == 1)
        await ingest(store, "b")  # an idle round after the retry: the kept time answers
        await real_time_until(lambda: sink.delivered == 1)
        await trio.testing.wait_all_tasks_blocked()
        asked = counting.next_due_asked
        mock_clock.jump(601)
        await real_time_until(lambda: sink.delivered == 2)
        await trio.testing.wait_all_tasks_blocked()
        sink.stop()

    assert sender.sends_of("a") == 2
    assert asked == 1
    assert counting.next_due_asked == 2  # once more, after the kept time came


async def test_a_row_scheduled_later_by_an_earlier_incarnation_is_sent_when_due(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """A retry the daemon scheduled before a restart is in no memory: the first idle round asks
    the store, and the sink sleeps until then."""
    await ingest(store, "a")

    def later(conn: Connection) -> None:
        conn.execute("UPDATE deliveries SET next_attempt_at = next_attempt_at + 300 WHERE stage = 'crm'")

    await store.call(later)
    sender = FakeSender()
    sink = Sink("crm", store, lambda: sender, retry=RETRY, clock=lambda: time.time() + trio.current_time())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        assert sender.sends_of("a") == 0
        mock_clock.jump(301)
        await real_time_until(lambda: sink.delivered == 1)
        sink.stop()
    assert (await store.call(rows))["a"][0] == DELIVERED


class Shared:
    """The store as a node of a cluster sees it: claims last `claim_lease` s after a fetch, and
    `taken` rows were claimed by another node meanwhile (renewing them fails)."""

    claim_lease = 10.0

    def __init__(self, store: Store) -> None:
        self._store = store
        self.taken: set[str] = set()
        self.renewed: list[list[int]] = []
        self.names: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def due_deliveries(self, stage: str, now: float, limit: int) -> list[Any]:
        rows = await self._store.due_deliveries(stage, now, limit)
        self.names.update((row.rowid, json.loads(row.payload)) for row in rows)
        return [row for row in rows if self.names[row.rowid] not in self.taken]  # another node's now

    async def renew_claims(self, stage: str, rowids: Sequence[int]) -> set[int]:
        self.renewed.append(list(rowids))
        return {rowid for rowid in rowids if self.names[rowid] not in self.taken}


async def test_a_row_whose_claim_may_have_lapsed_is_renewed_before_sending_and_dropped_if_taken(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """A row that waited longer than its claim can be trusted (here: behind a slow send) is
    renewed first; one another node claimed meanwhile is not sent here at all."""
    shared = Shared(store)
    release = trio.Event()

    class Slow(FakeSender):
        async def send(self, batch: Any) -> int | None:
            if json.loads(batch[0].payload) == "a":
                await release.wait()
            return await super().send(batch)

    sender = Slow()
    sink = Sink("crm", shared, lambda: sender, retry=RETRY, send_timeout=2.0)
    await ingest(store, "a", "b", "c")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await real_time_until(lambda: len(sender.batches) == 0 and len(shared.names) == 3)
        await trio.testing.wait_all_tasks_blocked()
        assert shared.renewed == [], "fresh claims are sent as they are"
        mock_clock.jump(9)  # b and c waited 9 s: less than the 10 s claim, more than 10 - 2
        shared.taken = {"b"}
        release.set()
        await real_time_until(lambda: sink.delivered == 2)
        await trio.testing.wait_all_tasks_blocked()
        sink.stop()
    sent = [json.loads(row.payload) for batch in sender.batches for row in batch]
    assert sent == ["a", "c"]
    assert sorted(shared.names[rowid] for renewal in shared.renewed for rowid in renewal) == ["b", "c"]
    assert sink._fetcher.lost == 1
    # The row left to the other node is still pending, neither dead nor delivered here.
    assert (await store.counts())["crm"] == {"pending": 1, "delivered": 2, "dead": 0}
