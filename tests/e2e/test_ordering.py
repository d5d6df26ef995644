"""Per-key ordering end to end: the real daemon, shuffled and duplicated webhooks, a failing key, kill -9."""

from __future__ import annotations

import json
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, free_port, until, write_config

PIPELINE = """
[control]
socket = "{socket}"

[sources.contacts]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["contacts"]
url = "{url}/contacts"
concurrency = 8
retry = {{ max_attempts = 50, initial_backoff = "50ms", max_backoff = "200ms" }}
ordering = {{ key = ".email", version = ".v", compare = "number" }}
"""


class Flaky:
    """Answers 503 to the first `failures` requests for `email`, 200 to everything else.

    `accepted` lists the (email, version) of each request answered 200, in order.
    """

    def __init__(self, email: str, failures: int) -> None:
        self.email, self.left = email, failures
        self.lock = threading.Lock()
        self.accepted: list[tuple[str, int]] = []

    def __call__(self, request: Received) -> Reply:
        body = request.json()
        with self.lock:
            if body["email"] == self.email and self.left > 0:
                self.left -= 1
                return 503, {}, b"busy"
            self.accepted.append((body["email"], body["v"]))
        return 200, {}, b"{}"

    def by_key(self) -> dict[str, list[int]]:
        seen: dict[str, list[int]] = defaultdict(list)
        with self.lock:
            for email, v in self.accepted:
                seen[email].append(v)
        return seen


@pytest.fixture
def flaky() -> Flaky:
    return Flaky("slow@example.com", 6)


@pytest.fixture
def receiver(flaky: Flaky) -> Iterator[FakeReceiver]:
    fake = FakeReceiver(flaky).start()
    yield fake
    fake.stop()


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path, receiver: FakeReceiver) -> Path:
    # A fixed port: one test restarts the daemon and its client keeps the address.
    body = PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url)
    return write_config(tmp_path, body, port=free_port())


def post(client: httpx.Client, email: str, v: int) -> None:
    response = client.post("/hooks/contacts", json={"email": email, "v": v, "name": f"{email} v{v}"})
    assert response.status_code == 202, response.text


def test_shuffled_duplicated_webhooks_arrive_in_version_order_and_old_ones_never_overwrite(
    config: Path, receiver: FakeReceiver, flaky: Flaky, tmp_path: Path
) -> None:
    rng = random.Random(4)
    keys = [f"c{n}@example.com" for n in range(12)] + ["slow@example.com"]
    sends = [(key, v) for key in keys for v in range(1, 9)]
    sends += rng.sample(sends, 30)  # duplicates (senders retrying)
    rng.shuffle(sends)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for key, v in sends[: len(sends) // 2]:
                post(client, key, v)
            daemon.kill9()  # at-least-once: a delivery may go out again, never out of order
            daemon.start()
            for key, v in sends[len(sends) // 2 :]:
                post(client, key, v)
            until(flaky.by_key, lambda seen: all(seen[key][-1:] == [8] for key in keys))

            # Older versions than what each key already has: stale, never sent.
            for key in keys:
                post(client, key, 3)
            stats = until(lambda: ctl_json(config, "stats"), lambda s: not s["stages"]["crm"]["pending"])
            text = ctl(config, "stats").stdout
    finally:
        daemon.stop()

    seen = flaky.by_key()
    for key in keys:
        assert seen[key] == sorted(seen[key]), f"{key} went back in time: {seen[key]}"
        assert seen[key][-1] == 8
    crm = stats["stages"]["crm"]
    assert crm["dead"] == 0
    assert crm["stale"] >= len(keys)
    assert crm["delivered"] + crm["stale"] == len(sends) + len(keys)
    assert stats["since_start"]["crm"]["stale"] >= len(keys)
    assert "STALE" in text
    logged = [line for line in daemon.logs() if line.get("msg") == "deliveries dropped as stale"]
    assert sum(len(line["delivery_ids"]) for line in logged) >= len(keys), "each stale id is logged"


def test_a_failing_key_holds_back_only_itself(config: Path, receiver: FakeReceiver, tmp_path: Path) -> None:
    fast = [f"fast{n}@example.com" for n in range(20)]
    refused: list[int] = []
    accepted: list[tuple[str, int]] = []
    lock = threading.Lock()

    def slow_until_the_rest_is_in(request: Received) -> Reply:
        body = request.json()
        with lock:
            if body["email"] == "slow@example.com" and len(accepted) < len(fast):
                refused.append(body["v"])
                return 503, {}, b"busy"
            accepted.append((body["email"], body["v"]))
        return 200, {}, b"{}"

    receiver.responder = slow_until_the_rest_is_in
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        # Everything is in the store before the sink starts: the slow key's 50 attempts (about
        # 5 s of full-jitter backoff below 200 ms) must outlast the delivery of the other twenty,
        # not the test's posting of them one by one, which a loaded machine can make longer.
        assert ctl(config, "pause", "crm").returncode == 0
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            post(client, "slow@example.com", 1)
            post(client, "slow@example.com", 2)
            for email in fast:
                post(client, email, 1)
        assert ctl(config, "resume", "crm").returncode == 0
        until(lambda: list(accepted), lambda got: ("slow@example.com", 2) in got)
    finally:
        daemon.stop()

    assert refused, "the slow key failed while the others went through"
    assert set(refused) == {1}, "only the head of the failing key was tried while it failed"
    assert accepted[-2:] == [("slow@example.com", 1), ("slow@example.com", 2)]


def test_bad_versions_are_dead_lettered_with_a_clear_reason(
    config: Path, receiver: FakeReceiver, tmp_path: Path
) -> None:
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            response = client.post("/hooks/contacts", json={"email": "x@example.com", "v": "tomorrow"})
            assert response.status_code == 202
            post(client, "y@example.com", 1)
            receiver.wait_for(lambda got: len(got) == 1)
            letters = until(lambda: ctl_json(config, "dlq", "list"), lambda got: got["items"])
    finally:
        daemon.stop()

    (letter,) = letters["items"]
    assert letter["last_error"] == 'ordering: version .v of key "x@example.com" is not a number: "tomorrow"'
    (line,) = [line for line in daemon.logs() if line.get("delivery_id") == letter["id"]]
    assert line["msg"] == "delivery dead-lettered"
    assert line["error"] == letter["last_error"]
    assert json.loads(receiver.snapshot()[0].body)["email"] == "y@example.com"
