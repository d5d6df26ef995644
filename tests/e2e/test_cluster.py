"""Cluster mode end to end: real ferry processes sharing one real PostgreSQL database (docs/cluster.md).

A transform and a poll source each run on exactly one node, move to another within the failover
bound when their node is killed with -9, and lose nothing; `ferry ctl status` lists the nodes and
their leases; a pause given to one node holds on every node. The headline scenario (three nodes,
webhooks round-robin while nodes are killed and restarted) is tests/chaos/test_cluster_kill9.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster import FAILOVER, HEARTBEAT, Cluster
from tests.fakes import FakeReceiver, ctl, until
from tests.postgres import postgres_url

__all__ = ["postgres_url"]

SLACK = 2.0
"""Beyond the failover bound: the next beat's round trip, the new holder's start, this test's
polling of the database (every 50 ms), on a loaded 2-core machine."""

TRANSFORMING = """
[sources.demo]
type = "webhook"
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["demo"]
map = '{id: .id, by: "transform"}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "RECEIVER/contacts"
concurrency = 4
retry = { max_attempts = 100, initial_backoff = "50ms", max_backoff = "300ms" }
"""


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, sock_dir: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_url, sock_dir, "")
    yield made
    made.stop()


def _post(url: str, n: int) -> str:
    answer = httpx.post(
        f"{url}/hooks/demo", json={"id": n}, headers={"Idempotency-Key": f"e-{n}"}, timeout=10
    )
    assert answer.status_code in (200, 202), answer.text
    event_id: str = answer.json()["id"]
    return event_id


def _delivered(receiver: FakeReceiver) -> set[int]:
    return {request.json()["id"] for request in receiver.snapshot()}


def test_a_transform_runs_on_one_node_and_fails_over_when_it_is_killed(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    cluster.pipeline = TRANSFORMING.replace("RECEIVER", receiver.url)
    nodes = [cluster.add(name).start() for name in ("a", "b", "c")]
    leader = until(lambda: cluster.holder("transform.shape"), lambda held: held is not None, timeout=20)
    others = [node for node in nodes if node.name != leader]

    status = others[0].status()
    listed = {node["id"]: node for node in status["nodes"]}
    assert len(listed) == 3
    assert all(node["alive"] for node in listed.values())
    holders = [node for node in listed.values() if "transform.shape" in node["leases"]]
    assert len(holders) == 1
    assert holders[0]["address"].endswith(f":{next(n.port for n in nodes if n.name == leader)}")
    assert sum(node["this"] for node in listed.values()) == 1
    shown = ctl(others[0].config, "status")
    assert "NODE" in shown.stdout
    assert "transform.shape" in shown.stdout

    ids = {n: _post(others[n % 2].daemon.url, n) for n in range(40)}  # ingested on the standbys
    receiver.wait_for(lambda requests: {r.json()["id"] for r in requests} >= set(ids), timeout=30)

    dead = next(node for node in nodes if node.name == leader)
    dead.kill9()
    killed = time.monotonic()
    successor = until(
        lambda: cluster.holder("transform.shape"), lambda held: held not in (None, leader), timeout=30
    )
    took = time.monotonic() - killed
    assert took <= FAILOVER + SLACK, f"failover took {took:.2f}s"
    print(f"\ntransform failover after kill -9: {took:.2f}s (bound {FAILOVER:g}s + start)")
    assert successor in {node.name for node in others}

    ids |= {n: _post(others[n % 2].daemon.url, n) for n in range(40, 80)}
    requests = receiver.wait_for(lambda requests: {r.json()["id"] for r in requests} >= set(ids), timeout=30)
    keys = {request.headers["idempotency-key"] for request in requests}
    assert keys == {f"{event_id}.shape.crm" for event_id in ids.values()}, "one key per event, stable"
    rows = cluster.query("SELECT count(*) FROM events WHERE stream = 'shape'")
    assert rows == [(80,)], "each event transformed exactly once, across the failover"


def test_a_pause_given_to_one_node_holds_on_every_node(cluster: Cluster, receiver: FakeReceiver) -> None:
    cluster.pipeline = TRANSFORMING.replace("RECEIVER", receiver.url)
    a, b = (cluster.add(name).start() for name in ("a", "b"))
    done = ctl(a.config, "pause", "demo")
    assert done.returncode == 0, done.stderr

    def refused() -> int:
        return httpx.post(f"{b.daemon.url}/hooks/demo", json={"id": 1}, timeout=10).status_code

    until(refused, lambda status: status == 503, timeout=HEARTBEAT * 4 + 2)
    assert ctl(b.config, "--json", "status").stdout.count('"demo"') >= 1
    b.kill9()  # a pause outlives a node's restart in a cluster
    b.start()
    assert refused() == 503
    assert ctl(b.config, "resume", "demo").returncode == 0
    until(
        lambda: httpx.post(f"{a.daemon.url}/hooks/demo", json={"id": 2}, timeout=10).status_code,
        lambda status: status == 202,
        timeout=HEARTBEAT * 4 + 2,
    )
    audit = ctl(a.config, "audit").stdout
    assert "pause" in audit
    assert "resume" in audit, "the audit trail is shared: b's resume shows on a"
