"""The sink: `judge` as a table, and the actor against a real store with a fake sender on cue."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from actors.sink.config import BatchConfig, RetryConfig
from actors.sink.guard import SinkGuard
from actors.sink.judge import judge
from actors.sink.sink import Sink
from daemon.config.limits import BreakerConfig
from daemon.config.units import Duration
from daemon.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from daemon.store import outbox
from daemon.store.outbox import Due
from daemon.store.schema import DEAD, DELIVERED, PENDING
from daemon.store.sqlite import Connection, Store

NOW = 1_000_000.0
RETRY = RetryConfig(
    max_attempts=5, initial_backoff=Duration(1), max_backoff=Duration(60), max_age=Duration(3600)
)


def due(rowid: int = 1, attempts: int = 0, age: float = 10.0) -> Due:
    return Due(rowid, f"evt{rowid}.crm", attempts, NOW - age, b"{}", None, f"evt{rowid}")


# -- judge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, None])
def test_judge_success_delivers_every_row_of_the_batch(status: int | None) -> None:
    outcomes = judge([due(1), due(2, attempts=3)], None, status, RETRY, NOW)
    assert outcomes == outbox.Outcomes(delivered=[(1, status), (2, status)], retry=[], dead=[])


@pytest.mark.parametrize(
    ("row", "error", "reason"),
    [
        pytest.param(due(), PermanentDelivery("HTTP 400", status=400), "HTTP 400", id="permanent-4xx"),
        pytest.param(
            due(),
            PermanentDelivery("redirect", status=301, retry_after=5),
            "redirect",
            id="permanent-ignores-retry-after",
        ),
        pytest.param(
            due(attempts=4),
            RetryableDelivery("HTTP 503", status=503),
            "gave up after 5 attempts: HTTP 503",
            id="out-of-attempts",
        ),
        pytest.param(
            due(attempts=1, age=3600),
            RetryableDelivery("HTTP 429", status=429, retry_after=1),
            "gave up after 3600s: HTTP 429",
            id="too-old",
        ),
        pytest.param(
            due(attempts=9),
            RetryableDelivery("timed out"),
            "gave up after 10 attempts: timed out",
            id="beyond-max",
        ),
    ],
)
def test_judge_dead_letters_permanent_and_exhausted_failures(
    row: Due, error: DeliveryError, reason: str
) -> None:
    outcomes = judge([row], error, None, RETRY, NOW)
    assert outcomes == outbox.Outcomes(delivered=[], retry=[], dead=[(row.rowid, error.status, reason)])


@pytest.mark.parametrize(
    ("row", "error", "earliest", "latest"),
    [
        pytest.param(
            due(attempts=0), RetryableDelivery("HTTP 503", status=503), 0.0, 1.0, id="first-failure"
        ),
        pytest.param(
            due(attempts=3), RetryableDelivery("HTTP 502", status=502), 0.0, 8.0, id="fourth-failure"
        ),
        pytest.param(
            due(attempts=0), RetryableDelivery("connection refused"), 0.0, 1.0, id="transport-error"
        ),
        pytest.param(
            due(attempts=0),
            RetryableDelivery("HTTP 429", status=429, retry_after=30),
            30.0,
            30.0,
            id="retry-after-floor",
        ),
        pytest.param(
            due(attempts=3),
            RetryableDelivery("HTTP 503", status=503, retry_after=0.5),
            0.5,
            8.0,
            id="retry-after-low",
        ),
        pytest.param(
            due(attempts=3, age=3599),
            RetryableDelivery("HTTP 500", status=500),
            0.0,
            8.0,
            id="just-young-enough",
        ),
    ],
)
def test_judge_schedules_retryable_failures(
    row: Due, error: DeliveryError, earliest: float, latest: float
) -> None:
    for _ in range(50):  # the jitter is random: every draw must land in range
        outcomes = judge([row], error, None, RETRY, NOW)
        [(rowid, at, status, message)] = outcomes.retry
        assert (outcomes.delivered, outcomes.dead) == ([], [])
        assert (rowid, status, message) == (row.rowid, error.status, str(error))
        assert NOW + earliest <= at <= NOW + latest
        if earliest < latest:
            assert at < NOW + latest


def test_judge_treats_each_row_of_a_failed_batch_on_its_own() -> None:
    error = RetryableDelivery("HTTP 503", status=503)
    outcomes = judge([due(1, attempts=0), due(2, attempts=4)], error, None, RETRY, NOW)
    assert [rowid for rowid, *_ in outcomes.retry] == [1]
    assert outcomes.dead == [(2, 503, "gave up after 5 attempts: HTTP 503")]


@pytest.mark.parametrize("retry_after", [1e12, 3600.0, 3000.0])
def test_judge_dead_letters_at_once_when_retry_after_ends_past_max_age(retry_after: float) -> None:
    row = due(attempts=0, age=1000)  # 2,600 s of its 3,600 s max_age left
    error = RetryableDelivery("HTTP 429", status=429, retry_after=retry_after)
    outcomes = judge([row], error, None, RETRY, NOW)
    reason = f"gave up: Retry-After {retry_after:g}s ends after max_age 3600s: HTTP 429"
    assert outcomes == outbox.Outcomes(delivered=[], retry=[], dead=[(row.rowid, 429, reason)])


def test_judge_caps_retry_after_at_an_hour_and_never_schedules_past_max_age() -> None:
    week = RetryConfig(
        max_attempts=5, initial_backoff=Duration(1), max_backoff=Duration(60), max_age=Duration(7 * 86400)
    )
    error = RetryableDelivery("HTTP 429", status=429, retry_after=1e12)
    [(_, at, _, _)] = judge([due()], error, None, week, NOW).retry
    assert at == NOW + 3600.0
    # Backoff that would end after the deadline is cut to it: one last attempt then.
    late = due(attempts=3, age=3599.5)
    [(_, at, _, _)] = judge([late], RetryableDelivery("HTTP 503", status=503), None, RETRY, NOW).retry
    assert NOW <= at <= late.created_at + 3600
    huge = RetryConfig(
        max_attempts=5, initial_backoff=Duration(1e15), max_backoff=Duration(1e15), max_age=Duration(1e15)
    )
    [(_, at, _, _)] = judge([due()], RetryableDelivery("HTTP 503", status=503), None, huge, NOW).retry
    assert at <= NOW + 7 * 86400


def test_judge_holds_a_failed_probe_within_the_caps() -> None:
    error = RetryableDelivery("HTTP 429", status=429, retry_after=1e12)
    [(_, at, _, _)] = judge([due(attempts=100, age=10**6)], error, None, RETRY, NOW, hold=True).retry
    assert at == NOW + 3600.0


# -- the actor ----------------------------------------------------------------------------------


@dataclass
class FakeSender:
    """Records every batch it is given; fails a payload with the errors queued for it, in order."""

    failures: dict[str, list[DeliveryError]] = field(default_factory=dict)
    batches: list[list[Due]] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    closed: bool = False

    async def send(self, batch: Sequence[Due]) -> int | None:
        self.batches.append(list(batch))
        self.sent_at.append(time.time())
        await trio.lowlevel.checkpoint()
        for row in batch:
            queued = self.failures.get(json.loads(row.payload))
            if queued:
                raise queued.pop(0)
        return 200

    async def aclose(self) -> None:
        self.closed = True

    def sends_of(self, name: str) -> int:
        return sum(json.loads(row.payload) == name for batch in self.batches for row in batch)


async def ingest(store: Store, *names: str) -> None:
    for name in names:
        await store.call(
            partial(
                outbox.insert_event,
                stream="demo",
                payload=json.dumps(name).encode(),
                trace=None,
                sinks=["crm"],
            ),
            wake=["crm"],
        )


def rows(conn: Connection) -> dict[str, tuple[Any, ...]]:
    """Each delivery by its event's payload: (state, attempts, next_attempt_at, last_status, last_error)."""
    found = conn.execute(
        "SELECT e.payload, d.state, d.attempts, d.next_attempt_at, d.last_status, d.last_error "
        "FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.stage = 'crm'"
    ).fetchall()
    return {json.loads(payload): tuple(rest) for payload, *rest in found}


async def until(
    store: Store, check: Callable[[dict[str, tuple[Any, ...]]], bool]
) -> dict[str, tuple[Any, ...]]:
    """Poll the store until `check(rows)` holds; fail after 5 s."""
    with trio.fail_after(5):
        while True:
            found = await store.call(rows)
            if check(found):
                return found
            await trio.sleep(0.005)


def settled(*names: str) -> Callable[[dict[str, tuple[Any, ...]]], bool]:
    return lambda found: all(name in found and found[name][0] != PENDING for name in names)


def make(store: Store, sender: FakeSender, retry: RetryConfig = RETRY, **kwargs: Any) -> Sink:
    return Sink("crm", store, lambda: sender, retry=retry, **kwargs)


async def test_delivers_pending_rows_and_new_ones(store: Store) -> None:
    sender = FakeSender()
    sink = make(store, sender)
    await ingest(store, "a", "b", "c")  # waiting in the store before the sink starts
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await ingest(store, "d")
        found = await until(store, settled("a", "b", "c", "d"))
        nursery.cancel_scope.cancel()

    assert {name: row[0:2] + row[3:] for name, row in found.items()} == dict.fromkeys(
        "abcd", (DELIVERED, 1, 200, None)
    )
    assert sorted(sender.sends_of(name) for name in "abcd") == [1, 1, 1, 1]
    assert all(len(batch) == 1 for batch in sender.batches)
    assert sink.delivered == 4
    assert re.fullmatch(r"<Sink crm \[in flight: \d, delivered: 4, retried: 0, dead: 0\]>", repr(sink))


async def test_retry_is_a_rescheduled_row_not_resent_before_it_is_due(store: Store) -> None:
    sender = FakeSender({"flaky": [RetryableDelivery("HTTP 503", status=503, retry_after=30)]})
    sink = make(store, sender)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        sent = time.time()  # the sink's clock: the attempt, and so its failure, comes after this
        await ingest(store, "flaky")
        found = await until(store, lambda found: found.get("flaky", (0, 0))[1] == 1)
        await ingest(store, "later")  # the sink fetches again; the retry is not due yet
        found = await until(store, settled("later"))
        nursery.cancel_scope.cancel()

    state, attempts, next_attempt_at, status, error = found["flaky"]
    assert (state, attempts, status, error) == (PENDING, 1, 503, "HTTP 503")
    assert next_attempt_at >= sent + 30  # Retry-After, counted from the failure
    assert sender.sends_of("flaky") == 1
    assert sink.retried == 1


async def test_retry_is_sent_again_once_due(store: Store) -> None:
    retry = RetryConfig(max_attempts=3, initial_backoff=Duration(0.01), max_backoff=Duration(0.01))
    sender = FakeSender({"flaky": [RetryableDelivery("HTTP 429", status=429, retry_after=0.2)]})
    sink = make(store, sender, retry)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await ingest(store, "flaky")
        found = await until(store, settled("flaky"))
        nursery.cancel_scope.cancel()

    assert found["flaky"][0:2] == (DELIVERED, 2)
    assert found["flaky"][3:] == (200, None)
    assert sender.sends_of("flaky") == 2
    assert sender.sent_at[1] - sender.sent_at[0] >= 0.2
    assert (sink.retried, sink.delivered) == (1, 1)


async def test_permanent_failure_is_dead_lettered_at_once(store: Store) -> None:
    sender = FakeSender({"bad": [PermanentDelivery("HTTP 422: missing email", status=422)]})
    sink = make(store, sender)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await ingest(store, "bad", "good")
        found = await until(store, settled("bad", "good"))
        nursery.cancel_scope.cancel()

    state, attempts, _, status, error = found["bad"]
    assert (state, attempts, status, error) == (DEAD, 1, 422, "HTTP 422: missing email")
    assert found["good"][0] == DELIVERED
    assert sender.sends_of("bad") == 1
    assert (sink.dead, sink.delivered) == (1, 1)


async def test_last_attempt_is_dead_lettered(store: Store) -> None:
    retry = RetryConfig(max_attempts=1)
    sender = FakeSender({"flaky": [RetryableDelivery("HTTP 500", status=500)]})
    sink = make(store, sender, retry)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await ingest(store, "flaky")
        found = await until(store, settled("flaky"))
        nursery.cancel_scope.cancel()

    assert found["flaky"][0:2] == (DEAD, 1)
    assert found["flaky"][4] == "gave up after 1 attempts: HTTP 500"


async def test_batches_group_rows_up_to_max_items(store: Store) -> None:
    sender = FakeSender()
    sink = make(store, sender, batch=BatchConfig(max_items=3, max_wait=Duration(5)))
    names = [f"e{n}" for n in range(6)]
    await ingest(store, *names)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await until(store, settled(*names))
        nursery.cancel_scope.cancel()

    assert [[json.loads(row.payload) for row in batch] for batch in sender.batches] == [names[:3], names[3:]]
    assert sink.delivered == 6


async def test_partial_batch_goes_after_max_wait(store: Store) -> None:
    sender = FakeSender()
    sink = make(store, sender, batch=BatchConfig(max_items=10, max_wait=Duration(0.1)))
    await ingest(store, "x", "y")
    async with trio.open_nursery() as nursery:
        began = time.time()
        await nursery.start(sink.run)
        await until(store, settled("x", "y"))
        nursery.cancel_scope.cancel()

    assert [len(batch) for batch in sender.batches] == [2]
    assert sender.sent_at[0] - began >= 0.1


async def test_failed_batch_fails_every_row_in_it(store: Store) -> None:
    sender = FakeSender({"e1": [PermanentDelivery("HTTP 400", status=400)]})
    sink = make(store, sender, batch=BatchConfig(max_items=3, max_wait=Duration(5)))
    await ingest(store, "e0", "e1", "e2")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        found = await until(store, settled("e0", "e1", "e2"))
        nursery.cancel_scope.cancel()

    assert {name: row[0] for name, row in found.items()} == {"e0": DEAD, "e1": DEAD, "e2": DEAD}
    assert len(sender.batches) == 1


async def test_stop_makes_run_return(store: Store) -> None:
    sender = FakeSender()
    sink = make(store, sender, concurrency=4)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await ingest(store, "a")
            await until(store, settled("a"))
            sink.stop()
        # The nursery closed by itself: run() returned without being cancelled.
        assert not nursery.cancel_scope.cancel_called
    assert sender.closed


async def open_breaker_sink(store: Store) -> tuple[Sink, SinkGuard, FakeSender]:
    """A sink whose only URL's breaker opens on the first failure and stays open for an hour."""
    breaker = BreakerConfig(failures=1, cool_down=Duration(3600))
    guard = SinkGuard("crm", ["http://crm.test/in"], concurrency=2, breaker=breaker)
    sender = FakeSender({"first": [RetryableDelivery("HTTP 503", status=503)]})
    return make(store, sender, concurrency=2, guard=guard), guard, sender


@pytest.mark.parametrize("release", ["stop", "pause"])
async def test_stop_and_pause_do_not_wait_for_an_open_breaker(store: Store, release: str) -> None:
    """Workers waiting for admission give their rows back: nothing sent, no attempt counted."""
    sink, guard, sender = await open_breaker_sink(store)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await ingest(store, "first")
            await until(store, lambda found: found.get("first", (0, 0))[1] == 1)
            assert guard.status().endpoints[0].state == "open"
            await ingest(store, "a", "b", "c")
            with trio.fail_after(2):
                while guard.status().in_flight < 2:  # both workers wait for admission
                    await trio.sleep(0.005)
            if release == "pause":
                sink.pause()
                await trio.testing.wait_all_tasks_blocked()
                assert guard.status().in_flight == 0, "paused workers left the admission queue"
            sink.stop()
        assert not nursery.cancel_scope.cancel_called, "run() returned by itself"
    found = await store.call(rows)
    assert [found[name][0:2] for name in "abc"] == [(PENDING, 0)] * 3
    assert sender.sends_of("a") + sender.sends_of("b") + sender.sends_of("c") == 0
    assert guard.status().in_flight == 0


async def real_time_until(check: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until `check()` holds, bounded in real time (a MockClock's time only moves on a jump)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in real time"
        await trio.testing.wait_all_tasks_blocked()


async def test_a_retry_comes_due_when_the_injected_clock_says_so(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """The sink's due times and its wait for the next one read its clock: a MockClock jump of ten
    minutes, not ten minutes of real time, brings a `Retry-After: 600` retry due."""
    sender = FakeSender(failures={"a": [RetryableDelivery("HTTP 503", status=503, retry_after=600)]})
    sink = make(store, sender, clock=lambda: time.time() + trio.current_time())
    await ingest(store, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await real_time_until(lambda: sink.retried == 1)
        mock_clock.jump(300)
        await trio.testing.wait_all_tasks_blocked()
        assert sender.sends_of("a") == 1  # not due yet on the sink's clock
        mock_clock.jump(301)
        await real_time_until(lambda: sink.delivered == 1)
        assert sender.sends_of("a") == 2
        sink.stop()
