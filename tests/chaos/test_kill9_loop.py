"""kill -9 loop: load running, SIGKILL at a random moment, restart; nothing acknowledged is lost.

Senders POST keyed events and retry until acknowledged, as real senders do. The receiver answers
one attempt in eight with 503 (so retries are being scheduled when the kill lands), and about a
third of the kills land just after a SIGHUP (a reload under way). Kill moments come from a seeded
random generator; the seed is printed, and `FERRY_CHAOS_SEED` replays a run.

At the end: every acknowledged event delivered (lost = 0); every copy of a delivery carried the
same `Idempotency-Key`; duplicates (a 2xx for a key already answered 2xx) are counted; the store
passes `PRAGMA integrity_check`; no delivery is dead.

Short (make test): 3 kills, 1,000 events. Full (make chaos): 50 kills, 20,000 events.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import trio

from daemon.store.schema import DEAD
from tests.chaos.load import FULL, post_until_acked
from tests.fakes import Daemon, FakeReceiver, Received, Reply, free_port, ok, write_config

KILLS = 50 if FULL else 3
EVENTS = 20_000 if FULL else 1_000

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id, name: (.first + " " + .last)}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
concurrency = 8
retry = {{ max_attempts = 1000, initial_backoff = "20ms", max_backoff = "300ms" }}
"""


class FlakyReceiver:
    """Answers 503 to one attempt in eight (chosen by a hash, so it varies per attempt)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # 2xx answers per idempotency key

    def __call__(self, request: Received) -> Reply:
        key = request.headers["idempotency-key"]
        with self.lock:
            self.attempts[key] += 1
            digest = hashlib.blake2b(f"{key}/{self.attempts[key]}".encode(), digest_size=1).digest()
            if digest[0] % 8 == 0:
                return 503, {"Retry-After": "0"}, b"busy"
            self.accepted[key] += 1
        return ok(request)


async def test_kill_9_at_random_moments_loses_no_acknowledged_event(tmp_path: Path) -> None:
    seed = int(os.environ.get("FERRY_CHAOS_SEED", random.randrange(1 << 30)))
    chance = random.Random(seed)
    flaky = FlakyReceiver()
    receiver = FakeReceiver(flaky).start()
    port = free_port()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url), port=port)
    log = tmp_path / "ferry.log"
    daemon = Daemon(config, log).start()
    restarts: list[float] = []
    kills = reloads = 0

    async def killer() -> None:
        nonlocal daemon, kills, reloads
        for _ in range(KILLS):
            await trio.sleep(chance.uniform(0.05, 0.6))
            if chance.random() < 0.33:
                daemon.signal(signal.SIGHUP)
                reloads += 1
                await trio.sleep(chance.uniform(0, 0.02))
            await trio.to_thread.run_sync(daemon.kill9)
            kills += 1
            began = time.monotonic()
            daemon = await trio.to_thread.run_sync(Daemon(config, log).start)
            restarts.append(time.monotonic() - began)

    def body(n: int) -> bytes:
        return msgspec.json.encode({"id": n, "first": "Ada", "last": f"Lovelace-{n}"})

    acked: dict[int, str] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            began = time.monotonic()
            acked = await post_until_acked(lambda: ("127.0.0.1", port), body, EVENTS, concurrency=24)
        posted = time.monotonic() - began
        wanted = {f"{event_id}.shape.crm" for event_id in acked.values()}
        with trio.fail_after(600 if FULL else 120):
            while not wanted <= flaky.accepted.keys():
                await trio.sleep(0.05)
        requests = receiver.snapshot()
        delivered = time.monotonic() - began - posted
    finally:
        daemon.stop()
        receiver.stop()

    keys: dict[int, set[str]] = defaultdict(set)
    for request in requests:
        keys[request.json()["id"]].add(request.headers["idempotency-key"])
    assert len(acked) == EVENTS
    lost = set(acked) - {n for n, k in keys.items() if any(flaky.accepted[key] for key in k)}
    assert not lost, f"acknowledged events never delivered: {sorted(lost)[:10]}"
    assert all(len(k) == 1 for k in keys.values()), "copies of one delivery carried different keys"
    for n, (key,) in ((n, k) for n, k in keys.items() if n in acked):
        assert key == f"{acked[n]}.shape.crm"
    duplicates = sum(count - 1 for count in flaky.accepted.values() if count > 1)
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "ferry.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM deliveries WHERE state = ?", (DEAD,)).fetchone() == (0,)
    assert kills == KILLS
    restarts.sort()
    print(
        f"\nkill -9 loop (seed {seed}): {kills} kills ({reloads} during a reload), "
        f"{EVENTS} events acknowledged, lost 0, {duplicates} duplicate deliveries (each with its "
        f"delivery's key), integrity ok; posting took {posted:.1f}s, delivery {delivered:.1f}s more; "
        f"restart to ready median {restarts[len(restarts) // 2]:.2f}s max {restarts[-1]:.2f}s"
    )
