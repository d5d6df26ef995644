"""The spine end to end: the real daemon process, real HTTP on 127.0.0.1, a real SQLite file, real signals."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.fakes import Daemon, FakeReceiver, Received, Reply, free_port, ok, until, write_config

PIPELINE = """
[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id, name: (.first + " " + .last)}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
concurrency = 8
timeout = "{timeout}"
retry = {{ max_attempts = {attempts}, initial_backoff = "100ms", max_backoff = "1s" }}
"""


def pipeline(url: str, *, timeout: str = "5s", attempts: int = 50) -> str:
    return PIPELINE.format(url=url, timeout=timeout, attempts=attempts)


Make = Callable[[str], Daemon]
Rows = list[tuple[object, ...]]


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


@pytest.fixture
def daemon_for(tmp_path: Path) -> Iterator[Make]:
    started: list[Daemon] = []

    def make(body: str, port: int | None = None) -> Daemon:
        config = write_config(tmp_path, body, port=port)
        daemon = Daemon(config, tmp_path / "ferry.log").start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


def event(n: int) -> dict[str, object]:
    return {"id": n, "first": "Ada", "last": f"Lovelace-{n}"}


async def post_all(
    base_url: str, numbers: list[int], *, concurrency: int = 50, keyed: bool = False
) -> dict[int, str]:
    """POST each event once, expecting 202; return n -> event id."""
    acked: dict[int, str] = {}
    todo = list(reversed(numbers))
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:

        async def worker() -> None:
            while todo:
                n = todo.pop()
                headers = {"Idempotency-Key": f"evt-{n}"} if keyed else {}
                response = await client.post("/hooks/demo", json=event(n), headers=headers)
                assert response.status_code == 202, response.text
                acked[n] = response.json()["id"]

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return acked


def delivered_ids(requests: list[Received]) -> Counter[int]:
    return Counter(request.json()["id"] for request in requests)


def db_rows(tmp_path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{tmp_path / 'state/ferry.db'}?mode=ro", uri=True)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def wait_rows(
    tmp_path: Path, query: str, predicate: Callable[[Rows], object], timeout: float = 30.0
) -> list[tuple[object, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = db_rows(tmp_path, query)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"store never satisfied the condition: {rows[:5]}"
        time.sleep(0.05)


async def test_thousand_concurrent_events_are_each_delivered_exactly_once(
    daemon_for: Make, receiver: FakeReceiver
) -> None:
    daemon = daemon_for(pipeline(receiver.url))
    acked = await post_all(daemon.url, list(range(1000)))
    assert len(acked) == 1000
    requests = receiver.wait_for(lambda seen: len(seen) >= 1000)
    counts = delivered_ids(requests)
    assert set(counts) == set(range(1000))
    assert max(counts.values()) == 1, "a delivery went out twice although nothing failed"
    first = next(r for r in requests if r.json()["id"] == 7)
    assert first.json() == {"id": 7, "name": "Ada Lovelace-7"}
    assert first.path == "/contacts"
    assert first.headers["idempotency-key"] == f"{acked[7]}.shape.crm"
    assert len({r.headers["idempotency-key"] for r in requests}) == 1000
    # Outcomes committed together share a line: still every delivery in exactly one line.
    logged = wait_outcome_lines(daemon, 1000)
    assert sorted(logged) == sorted(f"{acked[n]}.shape.crm" for n in range(1000))


def wait_outcome_lines(daemon: Daemon, count: int, timeout: float = 30.0) -> list[str]:
    """The delivery ids of the `delivered` outcome lines, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [
            delivery
            for line in daemon.logs()
            if line.get("logger") == "ferry.sink.outcome" and line.get("msg") == "delivered"
            for delivery in line.get("delivery_ids", [line.get("delivery_id")])
        ]
        if len(ids) >= count:
            return ids
        assert time.monotonic() < deadline, f"{len(ids)} of {count} deliveries logged"
        time.sleep(0.05)


async def test_kill_9_during_a_burst_loses_no_acknowledged_event(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    port = free_port()
    config = write_config(tmp_path, pipeline(receiver.url), port=port)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    # Each kill lands with the 40 posters' requests in flight and deliveries under way, whatever
    # the total: 500 events between kills (about a second of posting) put it in the middle of
    # the burst as surely as 1,000 did, for half the posting time.
    total, kills = 2500, 4
    acked: dict[int, str] = {}
    todo = list(reversed(range(total)))

    async def poster(client: httpx.AsyncClient) -> None:
        while todo:
            n = todo.pop()
            while True:
                try:
                    response = await client.post(
                        "/hooks/demo", json=event(n), headers={"Idempotency-Key": f"evt-{n}"}
                    )
                except httpx.TransportError:
                    await trio.sleep(0.01)  # the daemon is down: a real sender retries too
                    continue
                assert response.status_code in (202, 200), response.text
                acked[n] = response.json()["id"]
                break

    async def killer() -> None:
        nonlocal daemon
        for round_ in range(kills):
            target = (round_ + 1) * total // (kills + 1)
            while len(acked) < target:
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(daemon.kill9)
            daemon = await trio.to_thread.run_sync(Daemon(config, tmp_path / "ferry.log").start)

    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(killer)
        for _ in range(40):
            nursery.start_soon(poster, client)
    try:
        assert len(acked) == total
        requests = receiver.wait_for(lambda seen: set(delivered_ids(seen)) >= set(acked), timeout=120)
    finally:
        daemon.stop()
    keys: dict[int, set[str]] = defaultdict(set)
    for request in requests:
        keys[request.json()["id"]].add(request.headers["idempotency-key"])
    assert all(len(k) == 1 for k in keys.values()), "copies of one delivery carried different keys"
    duplicates = len(requests) - len(keys)
    kills_seen = sum(1 for line in daemon.logs() if line.get("msg") == "ready") - 1
    assert kills_seen == kills
    print(f"\nkill -9 x{kills} during {total} events: {duplicates} duplicate deliveries, 0 lost")


async def test_retry_after_is_honoured_and_never_early(daemon_for: Make, receiver: FakeReceiver) -> None:
    first_seen: dict[str, float] = {}
    lock = threading.Lock()

    def responder(request: Received) -> Reply:
        key = request.headers["idempotency-key"]
        with lock:
            if key not in first_seen:
                first_seen[key] = request.at
                return 503, {"Retry-After": "1"}, b"busy"
        return ok(request)

    receiver.responder = responder
    daemon = daemon_for(pipeline(receiver.url))
    await post_all(daemon.url, list(range(20)))
    requests = receiver.wait_for(lambda seen: sum(1 for r in seen if r.body) >= 40)
    for request in requests:
        key = request.headers["idempotency-key"]
        if request.at != first_seen[key]:
            assert request.at - first_seen[key] >= 1.0, "retried before Retry-After"
    assert set(delivered_ids(requests)) == set(range(20))


async def test_a_400_is_dead_lettered_at_once_with_status_and_body(
    daemon_for: Make, receiver: FakeReceiver, tmp_path: Path
) -> None:
    receiver.responder = lambda request: (400, {}, b'{"error":"email is required"}')
    daemon = daemon_for(pipeline(receiver.url))
    await post_all(daemon.url, list(range(5)))
    rows = wait_rows(
        tmp_path,
        "SELECT state, attempts, last_status, last_error FROM deliveries WHERE stage = 'crm'",
        lambda rows: len(rows) == 5 and all(row[0] == 2 for row in rows),
    )
    assert {row[1:] for row in rows} == {(1, 400, 'HTTP 400: {"error":"email is required"}')}
    assert len(receiver.snapshot()) == 5, "a permanent failure was retried"


async def test_429_storms_timeouts_and_hangups_are_retried_until_delivered(
    daemon_for: Make, receiver: FakeReceiver
) -> None:
    attempts: Counter[str] = Counter()
    lock = threading.Lock()

    def responder(request: Received) -> Reply:
        key = request.headers["idempotency-key"]
        with lock:
            attempts[key] += 1
            attempt = attempts[key]
        if attempt == 1:
            return 429, {"Retry-After": "0"}, b"slow down"
        if attempt == 2:
            time.sleep(0.6)  # longer than the sink's timeout
            return ok(request)
        if attempt == 3:
            return -1, {}, b""  # hang up without an answer
        if attempt == 4:
            return 502, {}, b"bad gateway"
        return ok(request)

    receiver.responder = responder
    daemon = daemon_for(pipeline(receiver.url, timeout="300ms"))
    await post_all(daemon.url, list(range(10)))
    seen = receiver.wait_for(lambda seen: len(attempts) == 10 and all(c >= 5 for c in attempts.values()))
    assert set(delivered_ids(seen)) == set(range(10))


async def test_a_sink_that_refuses_connections_gets_everything_once_it_is_back(
    tmp_path: Path, daemon_for: Make
) -> None:
    port = free_port()
    daemon = daemon_for(pipeline(f"http://127.0.0.1:{port}"))
    await post_all(daemon.url, list(range(50)))
    daemon.wait_log(
        lambda line: line.get("msg") == "delivery will be retried" and "refused" in line.get("error", "")
    )
    late = FakeReceiver().start(port)
    try:
        requests = late.wait_for(lambda seen: set(delivered_ids(seen)) >= set(range(50)))
    finally:
        late.stop()
    assert set(delivered_ids(requests)) == set(range(50))


async def test_exhausted_attempts_dead_letter_with_the_last_error(
    daemon_for: Make, receiver: FakeReceiver, tmp_path: Path
) -> None:
    receiver.responder = lambda request: (503, {}, b"down for maintenance")
    daemon = daemon_for(pipeline(receiver.url, attempts=3))
    await post_all(daemon.url, [1])
    rows = wait_rows(
        tmp_path,
        "SELECT state, attempts, last_status, last_error FROM deliveries WHERE stage = 'crm'",
        lambda rows: rows and rows[0][0] == 2,
    )
    assert rows == [(2, 3, 503, "gave up after 3 attempts: HTTP 503: down for maintenance")]
    assert len(receiver.snapshot()) == 3


async def test_repeated_idempotency_key_is_stored_and_delivered_once(
    daemon_for: Make, receiver: FakeReceiver, tmp_path: Path
) -> None:
    daemon = daemon_for(pipeline(receiver.url))
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        answers = [
            await client.post("/hooks/demo", json=event(1), headers={"Idempotency-Key": "same"})
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [202, 200, 200]
    assert len({a.json()["id"] for a in answers}) == 1
    receiver.wait_for(lambda seen: len(seen) >= 1)
    assert db_rows(tmp_path, "SELECT count(*) FROM events WHERE stream = 'demo'") == [(1,)]


async def test_sigterm_finishes_in_flight_deliveries_and_the_rest_resume(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    gate = threading.Event()
    arrived: list[int] = []  # requests held at the gate (appended by the handler threads)

    def slow(request: Received) -> Reply:
        arrived.append(request.json()["id"])
        gate.wait(30)
        return ok(request)

    receiver.responder = slow
    config = write_config(tmp_path, pipeline(receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    await post_all(daemon.url, list(range(30)))
    wait_rows(tmp_path, "SELECT count(*) FROM deliveries WHERE stage = 'crm'", lambda rows: rows[0][0] == 30)
    # The sink's eight workers each have a request in flight before the signal: stored rows alone
    # did not mean that on a loaded machine (SIGTERM came first; nothing was in flight, 0 sent).
    until(lambda: len(arrived), lambda held: held == 8)
    daemon.signal(signal.SIGTERM)
    daemon.wait_log(lambda line: line.get("msg") == "stopping")
    gate.set()  # the in-flight requests may now complete within the grace period
    assert daemon.wait(20) == 0
    delivered = len(receiver.snapshot())
    assert 0 < delivered < 30, "expected some deliveries in flight and the rest left in the store"
    pending = db_rows(tmp_path, "SELECT count(*) FROM deliveries WHERE stage = 'crm' AND state = 0")[0][0]
    assert pending == 30 - delivered
    restarted = Daemon(config, tmp_path / "ferry.log").start()
    try:
        requests = receiver.wait_for(lambda seen: set(delivered_ids(seen)) == set(range(30)))
    finally:
        restarted.stop()
    assert max(delivered_ids(requests).values()) == 1, "a delivery finished before shutdown was sent again"


async def test_a_batching_sink_sends_json_arrays_and_delivers_everything_once(
    daemon_for: Make, receiver: FakeReceiver
) -> None:
    body = pipeline(receiver.url) + 'batch = { max_items = 50, max_wait = "20ms" }\n'
    daemon = daemon_for(body)
    await post_all(daemon.url, list(range(500)))
    requests = receiver.wait_for(lambda seen: sum(len(r.json()) for r in seen) >= 500)
    items = [item["id"] for request in requests for item in request.json()]
    assert sorted(items) == list(range(500)), "an item was lost or sent twice"
    assert all(isinstance(request.json(), list) and len(request.json()) <= 50 for request in requests)
    assert len(requests) < 500, "nothing was batched"
    for request in requests:
        assert request.headers["idempotency-key"].startswith("batch-")
        assert request.headers["ferry-batch-size"] == str(len(request.json()))


async def test_bad_requests_get_specific_json_errors_and_store_nothing(
    daemon_for: Make, receiver: FakeReceiver, tmp_path: Path
) -> None:
    daemon = daemon_for(pipeline(receiver.url))
    json_type = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        cases = [
            (await client.post("/hooks/demo", content=b"{nope", headers=json_type), 400),
            (await client.post("/hooks/demo", content=b"a=1", headers={"content-type": "text/plain"}), 415),
            (await client.post("/hooks/demo", content=b"x" * (2 * 1024 * 1024), headers=json_type), 413),
            (await client.post("/hooks/nowhere", content=b"{}", headers=json_type), 404),
            (await client.get("/hooks/demo"), 405),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
    assert db_rows(tmp_path, "SELECT count(*) FROM events") == [(0,)]
    daemon.wait_log(lambda line: line.get("msg") == "ready")
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "the daemon must survive bad input"
