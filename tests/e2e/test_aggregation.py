"""Aggregation windows through the real daemon process across kill -9: nothing lost, nothing emitted twice."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, Received, free_port, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false

[sources.sales]
type = "webhook"

[transforms.by_category]
inputs = ["sales"]
map = '{{category, n}}'

[transforms.by_category.aggregate]
key = ".category"
max_events = 5
max_age = "1s"
reduce = '{{category: .[0].category, ns: map(.n)}}'

[sinks.report]
type = "http"
inputs = ["by_category"]
url = "{url}/report"
retry = {{ max_attempts = 50, initial_backoff = "50ms", max_backoff = "200ms" }}
"""
CATEGORIES = ["books", "games", "music"]


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


def post(daemon: Daemon, client: httpx.Client, n: int) -> None:
    body = {"category": CATEGORIES[n % 3], "n": n, "noise": "x" * 20}
    response = client.post(f"{daemon.url}/hooks/sales", json=body)
    assert response.status_code == 202, response.text


def test_windows_survive_kill_9_without_loss_or_double_emission(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url), port=free_port())
    log = tmp_path / "ferry.log"
    total = 45
    with httpx.Client(timeout=10) as client:
        daemon = Daemon(config, log).start()
        for n in range(0, 17):
            post(daemon, client, n)
        daemon.kill9()  # windows half full, some closed by count maybe mid-emission
        daemon = Daemon(config, log).start()
        for n in range(17, 31):
            post(daemon, client, n)
        daemon.kill9()
        daemon = Daemon(config, log).start()
        try:
            for n in range(31, total):
                post(daemon, client, n)

            def complete(seen: list[Received]) -> bool:
                unique = {r.headers["idempotency-key"]: r.json() for r in seen}
                return sum(len(body["ns"]) for body in unique.values()) >= total

            seen = receiver.wait_for(complete, timeout=30)
        finally:
            daemon.stop()

    # Several requests with one key are at-least-once retries of one emitted event; distinct
    # events must never share an input.
    by_key: dict[str, dict[str, Any]] = {}
    for request in seen:
        body = request.json()
        key = request.headers["idempotency-key"]
        assert by_key.setdefault(key, body) == body, "one delivery id, two different bodies"
    items = [n for body in by_key.values() for n in body["ns"]]
    assert sorted(items) == list(range(total)), "an input lost or emitted in two windows"
    for body in by_key.values():
        assert 1 <= len(body["ns"]) <= 5
        assert {CATEGORIES[n % 3] for n in body["ns"]} == {body["category"]}
        assert body["ns"] == sorted(body["ns"]), "a window's events keep their arrival order"

    # In the store: each window became one event and one delivery, and no window is left.
    with sqlite3.connect(tmp_path / "state" / "ferry.db") as db:
        events = db.execute("SELECT id FROM events WHERE stream = 'by_category'").fetchall()
        deliveries = db.execute("SELECT id FROM deliveries WHERE stage = 'report'").fetchall()
        left = db.execute("SELECT count(*) FROM windows").fetchone()[0]
    assert sorted(f"{e}.report" for (e,) in events) == sorted(d for (d,) in deliveries)
    assert len({e for (e,) in events}) == len(events) == len(by_key)
    assert left == 0
