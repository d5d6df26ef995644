"""Cluster mode end to end: real ferry processes sharing one real PostgreSQL database (docs/cluster.md).

A transform and a poll source each run on exactly one node, move to another within the failover
bound when their node is killed with -9, and lose nothing; `ferry ctl status` lists the nodes and
their leases; a pause given to one node holds on every node. The headline scenario (three nodes,
webhooks round-robin while nodes are killed and restarted) is tests/chaos/test_cluster_kill9.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster import FAILOVER, HEARTBEAT, LEASE_TTL, Cluster, Node
from tests.fake_api import ApiRequest, FakeApi
from tests.fakes import HTTP, FakeReceiver, Received, ctl, ctl_json, until
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
timeout = "2s"
concurrency = 4
retry = { max_attempts = 100, initial_backoff = "50ms", max_backoff = "300ms" }
"""


POLLING = """
[sources.items]
type = "poll"
url = "API/cursor/items?limit=50"
items = ".data"
key = ".id"
interval = "100ms"
jitter = 0
timeout = "2s"
initial_backoff = "50ms"
max_backoff = "200ms"
pagination = { style = "cursor", path = ".next_cursor" }
since = { field = ".updated_at", param = "updated_since", overlap = "5s" }
headers = { "X-Node" = "{node}" }

[sinks.out]
type = "http"
inputs = ["items"]
url = "RECEIVER/items"
timeout = "2s"
concurrency = 4
"""


def overlaps(requests: list[ApiRequest]) -> list[str]:
    """Where two nodes' requests were in flight at once: the fake API saw overlapping listings.

    Requests are taken in order of arrival and cut into runs by node; each run must be answered
    in full before the next node's first request arrives."""
    runs: list[list[ApiRequest]] = []
    for request in sorted(requests, key=lambda r: r.monotonic):
        if runs and runs[-1][0].headers["x-node"] == request.headers["x-node"]:
            runs[-1].append(request)
        else:
            runs.append([request])
    found = []
    for before, after in itertools.pairwise(runs):
        end = max(r.answered if r.answered is not None else float("inf") for r in before)
        if end > after[0].monotonic:
            found.append(
                f"{before[0].headers['x-node']} still in flight when {after[0].headers['x-node']} asked"
            )
    return found


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
    answer = HTTP.post(f"{url}/hooks/demo", json={"id": n}, headers={"Idempotency-Key": f"e-{n}"}, timeout=10)
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
    states = {actor["name"]: actor["state"] for actor in status["actors"]}
    assert states["transform.shape"] == "standby", "a node without the lease shows its singleton waiting"
    assert states["sink.crm"] == "running"
    shown = ctl(others[0].config, "status")
    assert "NODE" in shown.stdout
    assert "transform.shape" in shown.stdout

    ids = {n: _post(others[n % 2].daemon.url, n) for n in range(40)}  # ingested on the standbys
    receiver.wait_for(lambda requests: {r.json()["id"] for r in requests} >= set(ids), timeout=30)

    dead = next(node for node in nodes if node.name == leader)
    dead.kill9()
    successor = until(
        lambda: cluster.holder("transform.shape"), lambda held: held not in (None, leader), timeout=30
    )
    took = cluster.taken_after_beat("transform.shape", dead)
    # Not before the dead node's lease expired, and at a beat soon after.
    assert LEASE_TTL <= took <= FAILOVER + SLACK, f"taken {took:.2f}s after the dead node's last beat"
    print(f"\ntransform taken over {took:.2f}s after the dead node's last beat (bound {FAILOVER:g}s)")
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


def test_a_poll_source_is_polled_by_one_node_at_a_time_and_resumes_where_it_was(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    api = FakeApi(records=3000).start()
    # Once set (the index of the first request of the listing to kill), its pages past the
    # eighteenth wait for the kill: it lands inside that listing however late the test is.
    hold_from: list[int] = []
    killed = threading.Event()

    def slow(request: ApiRequest) -> tuple[int, dict[str, str], bytes] | None:
        start = hold_from[:1]
        if start and sum(1 for r in api.snapshot()[start[0] :] if r.query.get("cursor")) > 18:
            killed.wait(30)
        time.sleep(0.01)  # a listing of 40+ pages takes a good half second: room for a kill inside it
        return None

    api.responder = slow
    try:
        cluster.pipeline = POLLING.replace("API", api.url).replace("RECEIVER", receiver.url)
        nodes = [cluster.add(name).start() for name in ("a", "b", "c")]

        def mark() -> str | None:
            rows = cluster.query("SELECT mark FROM poll_state WHERE source = 'items'")
            return str(rows[0][0]) if rows and rows[0][0] else None

        until(mark, lambda value: value == api.record(3000)["updated_at"], timeout=60)
        api.add(2000)
        leader = until(lambda: cluster.holder("poll.items"), lambda held: held is not None)
        seen = len(api.snapshot())
        hold_from.append(seen)
        api.wait_for(lambda rs: sum(1 for r in rs[seen:] if r.query.get("cursor")) >= 8, timeout=30)
        dead = next(node for node in nodes if node.name == leader)
        dead.kill9()
        hold_from.clear()
        killed.set()
        killed_at = time.monotonic()
        listing = [r for r in api.snapshot() if r.headers["x-node"] == leader][-1]
        resumed = api.wait_for(
            lambda rs: any(r.headers["x-node"] != leader and r.monotonic > killed_at for r in rs), timeout=30
        )
        first = next(r for r in resumed if r.headers["x-node"] != leader and r.monotonic > killed_at)
        took = cluster.taken_after_beat("poll.items", dead)
        assert LEASE_TTL <= took <= FAILOVER + SLACK, f"taken {took:.2f}s after the dead node's last beat"
        print(f"\npoll source resumed on {first.headers['x-node']}, taken {took:.2f}s after the last beat")
        assert first.query.get("updated_since") == listing.query.get("updated_since") is not None, (
            "the new node resumed from the stored watermark, not from scratch"
        )
        until(
            lambda: cluster.query("SELECT count(*) FROM events WHERE stream = 'items'")[0][0],
            lambda count: count >= 5000,
            timeout=60,
        )
        until(mark, lambda value: value == api.record(5000)["updated_at"], timeout=60)
        assert cluster.query(
            "SELECT count(DISTINCT payload), count(*) FROM events WHERE stream = 'items'"
        ) == [(5000, 5000)], "each record stored exactly once across the failover"
        assert overlaps(api.snapshot()) == []
    finally:
        api.stop()


def test_the_overlap_check_is_not_blind() -> None:
    def request(node: str, at: float, answered: float | None) -> ApiRequest:
        return ApiRequest(0, at, "GET", "/", {}, {"x-node": node}, b"", 200, answered)

    assert overlaps([request("a", 0, 1), request("a", 1, 2), request("b", 3, 4)]) == []
    assert overlaps([request("a", 0, 1), request("b", 0.5, 2)]) != []
    assert overlaps([request("a", 0, None), request("b", 5, 6)]) != []


def test_a_drain_given_to_one_node_drains_the_cluster_and_every_node_exits_0(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    cluster.pipeline = TRANSFORMING.replace("RECEIVER", receiver.url)
    a, b = (cluster.add(name).start() for name in ("a", "b"))
    ids = {n: _post((a, b)[n % 2].daemon.url, n) for n in range(30)}
    done = ctl(a.config, "drain", "--timeout", "30s")
    assert done.returncode == 0, done.stderr
    assert "drained" in done.stdout
    assert {request.json()["id"] for request in receiver.snapshot()} >= set(ids), "the backlog went out first"
    assert a.daemon.wait(30) == 0
    assert b.daemon.wait(HEARTBEAT * 4 + 10) == 0, "the other node stops once the drain is done"
    b.start()  # a node started after the drain ended runs normally
    assert httpx.post(f"{b.daemon.url}/hooks/demo", json={"id": 99}, timeout=10).status_code == 202


def _listening_pair(cluster: Cluster, receiver: FakeReceiver) -> tuple[Node, Node]:
    """Two nodes with a heartbeat of a minute, both listening for the other's commits: (the
    transform's lease holder, the other)."""
    cluster.heartbeat, cluster.lease_ttl = 60.0, 180.0
    cluster.pipeline = TRANSFORMING.replace("RECEIVER", receiver.url)
    nodes = [cluster.add(name).start() for name in ("a", "b")]
    leader_name = until(lambda: cluster.holder("transform.shape"), lambda held: held is not None, timeout=20)
    for node in nodes:  # the listener connects after the node starts: commits before it are not heard
        until(node.status, lambda status: status["wake"]["listening"], timeout=15)
    leader = next(node for node in nodes if node.name == leader_name)
    return leader, next(node for node in nodes if node is not leader)


def test_work_committed_on_one_node_wakes_the_others_at_once_not_at_their_next_heartbeat(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    # No beat's wake-up moves these events; the commit's notification does
    # (daemon/store/postgres/wake.py), and the leader's status counts what it heard.
    leader, standby = _listening_pair(cluster, receiver)
    took = []
    for first in (0, 10, 20):  # each round after the last one is delivered: a wake-up each time
        started = time.monotonic()
        for n in range(first, first + 10):
            _post(standby.daemon.url, n)
        expected = set(range(first + 10))

        def all_delivered(_: list[Received], expected: set[int] = expected) -> bool:
            return _delivered(receiver) >= expected

        receiver.wait_for(all_delivered, timeout=10)
        took.append(time.monotonic() - started)
    print(f"\ningested on the standby, delivered by the leader's transform: {[f'{t:.2f}s' for t in took]}")
    assert cluster.query("SELECT count(*) FROM events WHERE stream = 'shape'") == [(30,)]
    heard = leader.status()["wake"]
    assert heard["listening"] is True
    assert heard["heard"] >= 3, "each round's ingest on the standby was heard by the leader"
    shown = ctl(standby.config, "status").stdout
    assert "other nodes' commits wake this node at once" in shown


def test_a_node_whose_listener_connection_is_cut_reconnects_and_still_hears(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    leader, standby = _listening_pair(cluster, receiver)
    # The server ends every listening session (as a restart or a proxy's idle timeout would).
    cut = cluster.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE %s",
        "% wake",
    )
    assert len(cut) == 2
    until(
        lambda: leader.status()["wake"],
        lambda wake: wake["listening"] and wake["connections"] == 2,
        timeout=15,
    )
    before = leader.status()["wake"]["heard"]
    for n in range(5):
        _post(standby.daemon.url, n)
    receiver.wait_for(lambda _: _delivered(receiver) >= set(range(5)), timeout=10)
    assert leader.status()["wake"]["heard"] > before


ALERTING = """
[alerting]
interval = "200ms"

[channels.ops]
type = "webhook"
url = "OPS/alerts"

[alerts.busy]
expr = 'increase(events_received{source="demo"}, 1m) >= 12'
severity = "warning"
notify = [{ channel = "ops" }]
"""


def test_an_alert_rule_counts_what_every_node_received_wherever_the_alerter_runs(
    cluster: Cluster, receiver: FakeReceiver
) -> None:
    ops = FakeReceiver().start()
    try:
        cluster.pipeline = TRANSFORMING.replace("RECEIVER", receiver.url) + ALERTING.replace("OPS", ops.url)
        nodes = [cluster.add(name).start() for name in ("a", "b", "c")]
        holder = until(lambda: cluster.holder("alerter"), lambda held: held is not None, timeout=20)
        others = [node for node in nodes if node.name != holder]
        alerter = next(node for node in nodes if node.name == holder)
        # The rule's window has its first readings (0 so far) before anything is posted.
        until(
            lambda: ctl_json(alerter.config, "alerts")["alerts"][0]["value"], lambda v: v == 0.0, timeout=20
        )
        # 8 events on each node without the alerter: no node alone reaches 12, the cluster does.
        for n in range(16):
            _post(others[n % 2].daemon.url, n)
        receiver.wait_for(lambda _: _delivered(receiver) >= set(range(16)), timeout=30)
        fired = ops.wait_for(lambda seen: len(seen) >= 1, timeout=20)[0].json()
        assert (fired["alert"], fired["status"]) == ("busy", "firing")
        assert fired["value"] >= 12
        published = {row[0] for row in cluster.query("SELECT node FROM ferry_node_metrics")}
        assert len(published) == 3, "every node publishes its metrics"
    finally:
        ops.stop()
