"""Three nodes on one PostgreSQL database, webhooks round-robin, nodes killed with -9 and restarted.

The headline scenario of cluster mode (docs/cluster.md, issue 15). Three `ferry run` processes
on 127.0.0.1 (own ports, own control sockets) share one database; senders POST keyed events
round-robin over the nodes, as a load balancer does (a new connection goes to the next node; a
refused or broken one is retried on the next), and retry until acknowledged. Meanwhile a killer
sends SIGKILL to a random node at random moments and restarts it on the same port. The pipeline
is webhook → transform (a singleton that fails over) → http sink with per-key ordering; the
receiver answers one attempt in eight with 503.

At the end: every acknowledged event reached the sink (or was superseded by a higher version of
its key, which per-key ordering drops as stale); every copy of one event carried the same
`Idempotency-Key` (duplicates only under the same key); per key, the versions the receiver
accepted never go down.

Short (make test): 1,500 events, 3 kills. Full (`FERRY_CHAOS=full`, make chaos): 10,000 events,
15 kills. The seed is printed; `FERRY_CHAOS_SEED` replays a run.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import pytest
import trio

from tests.chaos.load import FULL, post_until_acked
from tests.e2e.cluster import Cluster
from tests.fakes import FakeReceiver, Received, Reply, ok
from tests.postgres import postgres_url

__all__ = ["postgres_url"]
pytestmark = pytest.mark.timeout(7200 if FULL else 300)  # three nodes starting, killed and restarted

EVENTS = 10_000 if FULL else 1_500
KILLS = 15 if FULL else 3
KEYS = 50

PIPELINE = """
[sources.demo]
type = "webhook"
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["demo"]
map = '{n: .n, key: .key, v: .v}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "RECEIVER/contacts"
timeout = "2s"
concurrency = 8
retry = { max_attempts = 1000, initial_backoff = "20ms", max_backoff = "300ms" }
ordering = { key = ".key", version = ".v", compare = "number" }
"""


class Receiver:
    """Answers 503 to one attempt in eight; records each accepted (key, version, n, idempotency key)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.accepted: list[tuple[str, int, int, str]] = []

    def __call__(self, request: Received) -> Reply:
        key = request.headers["idempotency-key"]
        body = request.json()
        with self.lock:
            self.attempts[key] += 1
            digest = hashlib.blake2b(f"{key}/{self.attempts[key]}".encode(), digest_size=1).digest()
            if digest[0] % 8 == 0:
                return 503, {"Retry-After": "0"}, b"busy"
            self.accepted.append((body["key"], body["v"], body["n"], key))
        return ok(request)

    def snapshot(self) -> list[tuple[str, int, int, str]]:
        with self.lock:
            return list(self.accepted)


def _body(n: int) -> bytes:
    return msgspec.json.encode({"n": n, "key": f"k{n % KEYS}", "v": n})


async def test_three_nodes_killed_at_random_lose_no_acknowledged_event(
    tmp_path: Path, postgres_url: str, sock_dir: Path
) -> None:
    seed = int(os.environ.get("FERRY_CHAOS_SEED", random.randrange(1 << 30)))
    chance = random.Random(seed)
    flaky = Receiver()
    receiver = FakeReceiver(flaky).start()
    cluster = Cluster(tmp_path, postgres_url, sock_dir, PIPELINE.replace("RECEIVER", receiver.url))
    nodes = [cluster.add(name) for name in ("a", "b", "c")]
    for node in nodes:
        await trio.to_thread.run_sync(node.start)
    turn = itertools.count()
    kills = 0
    outage: list[float] = []

    def next_node() -> tuple[str, int]:
        """Round robin, as a load balancer: each new connection goes to the next node."""
        return "127.0.0.1", nodes[next(turn) % len(nodes)].port

    async def killer() -> None:
        nonlocal kills
        for _ in range(KILLS):
            await trio.sleep(chance.uniform(0.3, 2.0))
            victim = chance.choice(nodes)
            await trio.to_thread.run_sync(victim.kill9)
            kills += 1
            down = time.monotonic()
            await trio.sleep(chance.uniform(0.0, 1.0))
            await trio.to_thread.run_sync(victim.start)
            outage.append(time.monotonic() - down)

    acked: dict[int, str] = {}
    try:
        began = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            acked = await post_until_acked(next_node, _body, EVENTS, concurrency=24)
        posted = time.monotonic() - began

        def settled() -> bool:
            best: dict[str, int] = {}
            seen = set()
            for key, v, n, _ in flaky.snapshot():
                best[key] = max(best.get(key, -1), v)
                seen.add(n)
            return all(n in seen or best.get(f"k{n % KEYS}", -1) > n for n in acked)

        with trio.fail_after(600 if FULL else 150):
            while not settled():
                await trio.sleep(0.1)
        delivered = time.monotonic() - began - posted
    finally:
        cluster.stop()
        receiver.stop()

    accepted = flaky.snapshot()
    assert len(acked) == EVENTS
    keys_of: dict[int, set[str]] = defaultdict(set)
    for _, _, n, key in accepted:
        keys_of[n].add(key)
    assert all(len(keys) == 1 for keys in keys_of.values()), "copies of one event carried different keys"
    for n, (key,) in ((n, k) for n, k in keys_of.items() if n in acked):
        assert key == f"{acked[n]}.shape.crm"
    versions: dict[str, list[int]] = defaultdict(list)
    for key, v, _, _ in accepted:
        versions[key].append(v)
    went_down = {key: vs for key, vs in versions.items() if any(b < a for a, b in itertools.pairwise(vs))}
    assert not went_down, f"versions went down at the sink for {sorted(went_down)[:5]}"
    superseded = sum(1 for n in acked if n not in keys_of)
    duplicates = len(accepted) - len(keys_of)
    assert kills == KILLS
    print(
        f"\ncluster kill -9 loop (seed {seed}): 3 nodes, {kills} kills, {EVENTS} events acknowledged, "
        f"lost 0, {superseded} superseded by a newer version of their key (stale), {duplicates} "
        f"duplicate deliveries (each under its event's key); posting {posted:.1f}s, delivery "
        f"{delivered:.1f}s more; a killed node was back after {max(outage):.1f}s at most"
    )
