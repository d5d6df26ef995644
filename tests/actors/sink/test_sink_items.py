"""Per-item outcomes of a batch: `judge` with refused items, the HTTP sender reading a real 207,
and the sink actor (real store, real local server) settling each item on its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Any

import msgspec
import pytest
import trio

from actors.sink.config import HttpSinkConfig, RetryConfig
from actors.sink.http import HttpSender
from actors.sink.judge import Answer, judge
from actors.sink.sink import Sink
from daemon.config.units import Duration, dec_hook
from daemon.errors import PermanentDelivery, RetryableDelivery
from daemon.store import outbox
from daemon.store.outbox import Due
from daemon.store.schema import DEAD, DELIVERED, PENDING
from daemon.store.sqlite import Store
from tests.actors.sink.test_sink import NOW, RETRY, due
from tests.fakes import FakeReceiver, Received, Reply

# -- judge --------------------------------------------------------------------------------------


def test_judge_settles_each_refused_item_alone_and_delivers_the_rest() -> None:
    items = {
        1: PermanentDelivery("item refused (HTTP 400): bad email", status=400),
        2: RetryableDelivery("item refused (HTTP 429): slow down", status=429),
        3: RetryableDelivery("item refused (HTTP 503): busy", status=503),
    }
    batch = [due(1), due(2), due(3), due(4, attempts=4), due(5)]
    outcomes = judge(batch, None, 207, RETRY, NOW, items=items)
    assert outcomes.delivered == [(1, 207), (5, 207)]
    assert outcomes.dead == [
        (2, 400, "item refused (HTTP 400): bad email"),
        (4, 503, "gave up after 5 attempts: item refused (HTTP 503): busy"),
    ]
    [(rowid, at, status, message)] = outcomes.retry
    assert (rowid, status, message) == (3, 429, "item refused (HTTP 429): slow down")
    assert NOW <= at <= NOW + 1


def test_judge_without_items_is_unchanged() -> None:
    assert judge([due(1), due(2)], None, 207, RETRY, NOW, items={}) == outbox.Outcomes(
        delivered=[(1, 207), (2, 207)], retry=[], dead=[]
    )


# -- the HTTP sender against a real server --------------------------------------------------------


def hubspot(request: Received) -> Reply:
    """A HubSpot batch endpoint refusing every input whose email is at invalid.example."""
    inputs = request.json()["inputs"]
    refused = [item for item in inputs if item["id"].endswith("@invalid.example")]
    errors = [
        {
            "status": "error",
            "category": "VALIDATION_ERROR",
            "message": f"Property values were not valid: {item['id']}",
            "context": {"objectWriteTraceId": [item["objectWriteTraceId"]]},
        }
        for item in refused
    ]
    results = [{"id": str(n), "properties": {}} for n, item in enumerate(inputs) if item not in refused]
    body: dict[str, Any] = {"status": "COMPLETE", "results": results}
    if errors:
        body |= {"numErrors": len(errors), "errors": errors}
    return (207 if errors else 200), {"content-type": "application/json"}, json.dumps(body).encode()


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver(hubspot).start()
    yield fake
    fake.stop()


def contact(email: str) -> dict[str, Any]:
    return {"idProperty": "email", "id": email, "objectWriteTraceId": email, "properties": {"email": email}}


def dues(*emails: str) -> list[Due]:
    return [
        Due(n, f"e{n}.crm", 0, 0.0, json.dumps(contact(email)).encode(), None, f"e{n}")
        for n, email in enumerate(emails)
    ]


def sender_for(url: str, item_outcomes: dict[str, Any] | None = None) -> HttpSender:
    batch: dict[str, Any] = {"max_items": 10, "envelope": "inputs"}
    if item_outcomes is not None:
        batch["item_outcomes"] = item_outcomes
    config = msgspec.convert({"type": "http", "inputs": ["x"], "url": url, "batch": batch}, HttpSinkConfig)
    return HttpSender("crm", config)


async def test_a_207_names_the_refused_items(receiver: FakeReceiver) -> None:
    sender = sender_for(receiver.url, {"preset": "hubspot"})
    try:
        answer = await sender.send(dues("a@x.io", "b@invalid.example", "c@x.io"))
    finally:
        await sender.aclose()
    assert isinstance(answer, Answer)
    assert answer.status == 207
    assert answer.items is not None
    assert {index: (type(error), error.status, str(error)) for index, error in answer.items.items()} == {
        1: (
            PermanentDelivery,
            400,
            "item refused (HTTP 400): VALIDATION_ERROR: Property values were not valid: b@invalid.example",
        )
    }


async def test_without_item_outcomes_a_207_delivers_the_whole_batch(receiver: FakeReceiver) -> None:
    sender = sender_for(receiver.url)
    try:
        answer = await sender.send(dues("a@x.io", "b@invalid.example"))
    finally:
        await sender.aclose()
    assert isinstance(answer, Answer)
    assert (answer.status, answer.items) == (207, None)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>oops</html>", "the answer is not JSON"),
        (
            b'{"errors": [{"category": "VALIDATION_ERROR", "context": {"ids": ["z@x.io"]}}]}',
            "matches no item",
        ),
        (b'{"errors": [{"category": "VALIDATION_ERROR", "message": "no context"}]}', "names no item"),
    ],
)
async def test_an_unreadable_answer_retries_the_whole_batch(body: bytes, why: str) -> None:
    fake = FakeReceiver(lambda _: (207, {}, body)).start()
    sender = sender_for(fake.url, {"preset": "hubspot"})
    try:
        with pytest.raises(RetryableDelivery) as info:
            await sender.send(dues("a@x.io", "b@x.io"))
    finally:
        await sender.aclose()
        fake.stop()
    assert info.value.status == 207
    assert str(info.value).startswith("HTTP 207, but its item outcomes cannot be read (")
    assert why in str(info.value)
    assert "the whole batch is retried" in str(info.value)


# -- the sink actor ---------------------------------------------------------------------------------


async def test_refused_items_retry_or_dead_letter_alone_and_the_rest_are_delivered_once(
    store: Store,
) -> None:
    refusals = {"flaky@x.io": 1}  # refused (429) once, then accepted

    def answer(request: Received) -> Reply:
        errors, results = [], []
        for item in request.json()["inputs"]:
            email = item["id"]
            if email.endswith("@invalid.example"):
                errors.append({"category": "VALIDATION_ERROR", "message": "bad", "context": {"ids": [email]}})
            elif refusals.get(email):
                refusals[email] -= 1
                errors.append({"category": "RATE_LIMITS", "message": "later", "context": {"ids": [email]}})
            else:
                results.append({"id": email})
        return 207, {}, json.dumps({"status": "COMPLETE", "results": results, "errors": errors}).encode()

    fake = FakeReceiver(answer).start()
    config = msgspec.convert(
        {
            "type": "http",
            "inputs": ["x"],
            "url": fake.url,
            "batch": {
                "max_items": 10,
                "max_wait": "200ms",
                "envelope": "inputs",
                "item_outcomes": {"preset": "hubspot"},
            },
        },
        HttpSinkConfig,
        dec_hook=dec_hook,
    )
    retry = RetryConfig(max_attempts=5, initial_backoff=Duration(0.05), max_backoff=Duration(0.05))
    sink = Sink("crm", store, lambda: HttpSender("crm", config), retry=retry, batch=config.batch)
    names = ["a@x.io", "bad@invalid.example", "flaky@x.io", "d@x.io"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            for name in names:
                payload = json.dumps(contact(name)).encode()
                insert = partial(
                    outbox.insert_event, stream="demo", payload=payload, trace=None, sinks=["crm"]
                )
                await store.call(insert, wake=["crm"])
            found = await until_settled(store, names)
            nursery.cancel_scope.cancel()
    finally:
        fake.stop()

    assert found["bad@invalid.example"][:2] == (DEAD, 1)
    assert found["bad@invalid.example"][3:] == (400, "item refused (HTTP 400): VALIDATION_ERROR: bad")
    assert found["flaky@x.io"][:2] == (DELIVERED, 2)
    assert found["a@x.io"][:2] == found["d@x.io"][:2] == (DELIVERED, 1)
    sent = [item["id"] for request in fake.snapshot() for item in request.json()["inputs"]]
    assert sorted(sent) == sorted([*names, "flaky@x.io"]), (
        "each accepted item went out once, the refused alone"
    )
    assert (sink.delivered, sink.dead, sink.retried) == (3, 1, 1)


async def until_settled(store: Store, emails: list[str]) -> dict[str, tuple[Any, ...]]:
    def by_email(conn: Any) -> dict[str, tuple[Any, ...]]:
        found = conn.execute(
            "SELECT e.payload, d.state, d.attempts, d.next_attempt_at, d.last_status, d.last_error "
            "FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.stage = 'crm'"
        ).fetchall()
        return {json.loads(payload)["id"]: tuple(rest) for payload, *rest in found}

    with trio.fail_after(10):
        while True:
            found = await store.call(by_email)
            if all(email in found and found[email][0] != PENDING for email in emails):
                return found
            await trio.sleep(0.01)
