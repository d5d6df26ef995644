"""The design's floor (`bench.skeleton`) keeps the contract it is measured for: every event it
answers 202 reaches the receiver once, transformed, under its delivery id; a retried one too;
with `--batch`, once in one of the JSON arrays it posts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import Skeleton, query
from bench.skeleton import BATCH_CONCURRENCY
from daemon.store.schema import DELIVERED
from tests.fakes import HTTP, FakeReceiver, Received, Reply, until

EVENTS = 5


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


def _post_events(skeleton: Skeleton, count: int = EVENTS) -> list[str]:
    """Post `count` events; the ids its 202s answered with."""
    ids = []
    for n in range(count):
        body = {"id": n, "first": "Ada", "last": f"L{n}", "email": f"{n}@example.com"}
        response = HTTP.post(skeleton.url + "/hooks/bench", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def _delivered(skeleton: Skeleton) -> int:
    return query(skeleton.db, "SELECT count(*) FROM deliveries WHERE state = ?", DELIVERED)


def test_every_accepted_event_is_delivered_once_transformed(receiver: FakeReceiver, tmp_path: Path) -> None:
    skeleton = Skeleton(tmp_path / "skeleton", receiver.url + "/event")
    try:
        ids = _post_events(skeleton)
        seen = receiver.wait_for(lambda requests: len(requests) >= EVENTS, timeout=30)
        until(lambda: _delivered(skeleton), lambda count: count == EVENTS)
        assert skeleton.accepted() == EVENTS
    finally:
        skeleton.stop()
    assert len(receiver.snapshot()) == EVENTS
    assert sorted(request.headers["idempotency-key"] for request in seen) == sorted(
        f"{event_id}.shape.out" for event_id in ids
    )
    assert sorted(request.json()["name"] for request in seen) == [f"Ada L{n}" for n in range(EVENTS)]
    assert skeleton.proc.returncode == 0


def test_a_delivery_the_receiver_refuses_for_now_is_sent_again(
    receiver: FakeReceiver, tmp_path: Path
) -> None:
    tried: set[str] = set()

    def first_503(request: Received) -> Reply:
        key = request.headers["idempotency-key"]
        if key in tried:
            return 200, {}, b"{}"
        tried.add(key)
        return 503, {}, json.dumps({"error": "busy"}).encode()

    receiver.responder = first_503
    skeleton = Skeleton(tmp_path / "skeleton", receiver.url + "/event")
    try:
        _post_events(skeleton)
        until(lambda: _delivered(skeleton), lambda count: count == EVENTS)
    finally:
        skeleton.stop()
    keys = [request.headers["idempotency-key"] for request in receiver.snapshot()]
    assert len(keys) == 2 * EVENTS
    assert len(set(keys)) == EVENTS


def test_batching_sends_every_accepted_event_once_in_arrays(receiver: FakeReceiver, tmp_path: Path) -> None:
    """`--batch`: the events arrive as JSON arrays under batch keys, each event in exactly one of
    them. The receiver holds its answers until every event is stored: the workers then hold at
    most one request each, the channel one chunk per worker and the fetcher one more, so the
    events stored after those (posted one by one, each fetched alone at worst) are fetched, and
    sent, together."""
    gate = threading.Event()
    count = 2 * BATCH_CONCURRENCY + 4

    def held(request: Received) -> Reply:
        gate.wait(30)
        return 200, {}, b"{}"

    receiver.responder = held
    skeleton = Skeleton(tmp_path / "skeleton", receiver.url + "/batch", batch=True)
    try:
        ids = _post_events(skeleton, count)
        gate.set()
        until(lambda: _delivered(skeleton), lambda delivered: delivered == count)
        assert skeleton.accepted() == count
    finally:
        gate.set()
        skeleton.stop()
    requests = receiver.snapshot()
    items = [item for request in requests for item in request.json()]
    assert sorted(item["name"] for item in items) == sorted(f"Ada L{n}" for n in range(count))
    assert len(set(ids)) == count
    assert len(requests) < count  # some went together
    keys = [request.headers["idempotency-key"] for request in requests]
    assert len(set(keys)) == len(keys)
    assert all(key.startswith("batch-") for key in keys)
    assert skeleton.proc.returncode == 0
