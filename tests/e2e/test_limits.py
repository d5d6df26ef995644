"""Outbound limits end to end: the real daemon, real HTTP on 127.0.0.1, the real SQLite file.

A shared rate-limit budget read off the fake API's request log, a 429's Retry-After honoured by
every user of the budget, a circuit breaker that keeps a dead sink's deliveries in the store
without spending their attempts, and failover to a second URL and back.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from daemon.store.schema import DEAD, DELIVERED, PENDING
from tests.fake_api import FakeApi
from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl_json, ok, write_config

Make = Callable[[str], Daemon]


@pytest.fixture
def daemon_for(tmp_path: Path, sock_dir: Path) -> Iterator[Make]:
    started: list[Daemon] = []

    def make(body: str) -> Daemon:
        # No OTLP export to a collector that is not there (it costs seconds at shutdown).
        quiet = "" if "[telemetry]" in body else "[telemetry]\nmetrics = false\n"
        config = write_config(tmp_path, f'{quiet}[control]\nsocket = "{sock_dir}/ferry.sock"\n{body}')
        daemon = Daemon(config, tmp_path / "ferry.log").start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi().start()
    yield fake
    fake.stop()


def post(daemon: Daemon, count: int, source: str = "demo") -> None:
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        for n in range(count):
            assert client.post(f"/hooks/{source}", json={"n": n}).status_code == 202


def deliveries(tmp_path: Path) -> list[tuple[str, str, int, int]]:
    """(delivery id, stage, state, attempts) of every delivery, read from the real store file."""
    with sqlite3.connect(tmp_path / "state" / "ferry.db") as conn:
        return conn.execute("SELECT id, stage, state, attempts FROM deliveries ORDER BY id").fetchall()


def most_in_any_window(times: list[float], width: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - width:
            start += 1
        most = max(most, end - start + 1)
    return most


TWO_SINKS = """
[rate_limits.api]
rate = {rate}
per = "1s"
burst = {burst}

[sources.demo]
type = "webhook"
{poller}
[sinks.alpha]
type = "http"
inputs = ["demo"]
url = "{url}/alpha"
concurrency = 8
rate_limit = "api"
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "500ms" }}

[sinks.beta]
type = "http"
inputs = ["demo"]
url = "{url}/beta"
concurrency = 8
rate_limit = "api"
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "500ms" }}
"""


POLLER = """
[sources.feed]
type = "poll"
url = "{url}/cursor/items?limit=5"
items = ".data"
key = ".id"
interval = "10ms"
jitter = 0
timeout = "2s"
pagination = {{ style = "cursor", path = ".next_cursor" }}
rate_limit = "api"
"""


def test_a_poller_and_two_sinks_sharing_a_budget_never_exceed_it_and_take_turns(
    daemon_for: Make, api: FakeApi
) -> None:
    api.add(20)  # four pages a cycle, then the poller keeps asking for more
    rate, burst, events = 25, 2, 20
    poller = POLLER.format(url=api.url)
    daemon = daemon_for(TWO_SINKS.format(rate=rate, burst=burst, url=api.url, poller=poller))
    post(daemon, events)
    seen = api.wait_for(lambda log: sum(r.method == "POST" and r.status == 200 for r in log) >= 2 * events)

    arrivals = [r.monotonic for r in seen]
    # Over any second at most burst + rate requests may start; one more for arrival jitter.
    assert most_in_any_window(arrivals, 1.0) <= burst + rate + 1
    assert max(arrivals) - min(arrivals) >= (len(seen) - burst) / rate - 0.2, "not rate limited at all"
    users = [("poll" if r.method == "GET" else r.path) for r in sorted(seen, key=lambda r: r.monotonic)]
    start = min(users.index("/alpha"), users.index("/beta"))
    busy = users[start : start + events + events // 2]  # every user still had work queued here
    shares = {user: busy.count(user) / len(busy) for user in ("/alpha", "/beta", "poll")}
    assert all(share >= 0.25 for share in shares.values()), shares  # round robin: a third each
    status = ctl_json(daemon.config_path, "status")
    granted = status["rate_limits"]["api"]["granted"]
    assert (granted["alpha"], granted["beta"]) == (events, events)
    assert sum(granted.values()) >= len(seen) - 1  # a poll may be on the wire right now
    assert status["guards"]["alpha"]["rate_limit"] == "api"


def test_after_a_429_nobody_calls_before_retry_after(daemon_for: Make, api: FakeApi) -> None:
    per = 2.0
    api.quota = (8, per)  # the upstream allows less than the configured budget: it will say 429
    events = 12
    daemon = daemon_for(TWO_SINKS.format(rate=50, burst=8, url=api.url, poller=""))
    post(daemon, events // 2)
    log = api.wait_for(lambda log: any(r.status == 429 for r in log), timeout=20)
    first = min(r.monotonic for r in log if r.status == 429)
    time.sleep(max(0.0, first + 0.3 - time.monotonic()))  # well inside the first Retry-After (>= 1 s)
    post(daemon, events // 2)  # new work while the budget is paused waits for the reset too
    seen = api.wait_for(lambda log: sum(r.status == 200 for r in log) >= 2 * events, timeout=40)

    refusals = [r for r in seen if r.status == 429]
    assert refusals, "the quota was never hit: the test proves nothing"
    for refused in refusals:
        at = refused.monotonic
        # The fake's Retry-After is at least 1 s and at least until the oldest answered request
        # in its window leaves it.
        window = [r.monotonic for r in seen if r.status == 200 and at - per < r.monotonic <= at]
        retry_after = max(1.0, min(window) + per - at) if window else 1.0
        # Requests already on the wire when the 429 was answered arrive within moments; after
        # that nobody (neither sink) calls until Retry-After has passed.
        early = [r for r in seen if at + 0.1 < r.monotonic < at + retry_after - 0.05]
        assert early == [], f"called {len(early)} time(s) within Retry-After {retry_after:.2f}s of a 429"
    status = ctl_json(daemon.config_path, "status")
    assert status["rate_limits"]["api"]["pauses"] >= 1
    assert wait_delivered(daemon, 2 * events)


class Switch:
    """A receiver's health, flipped by the test: down answers 503 (and counts them)."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.refused = 0

    def __call__(self, request: Received) -> Reply:
        if self.down.is_set():
            self.refused += 1
            return 503, {}, b'{"error":"down"}'
        return ok(request)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def wait_delivered(daemon: Daemon, count: int, timeout: float = 20.0) -> bool:
    """Wait until `count` deliveries are delivered; none may be dead-lettered meanwhile."""

    def done() -> bool:
        rows = deliveries(daemon.config_path.parent)
        assert all(state != DEAD for _, _, state, _ in rows), rows
        return sum(state == DELIVERED for _, _, state, _ in rows) >= count

    wait_until(done, f"{count} deliveries delivered", timeout)
    return True


def log_count(daemon: Daemon, prefix: str) -> int:
    return sum(str(line.get("msg", "")).startswith(prefix) for line in daemon.logs())


BREAKER = """
[sources.demo]
type = "webhook"

[sinks.out]
type = "http"
inputs = ["demo"]
{urls}
concurrency = 2
breaker = {{ failures = 3, cool_down = "1s" }}
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "200ms" }}
"""


def test_an_open_breaker_keeps_deliveries_in_the_store_without_spending_attempts(daemon_for: Make) -> None:
    switch = Switch()
    receiver = FakeReceiver(switch).start()
    try:
        switch.down.set()
        daemon = daemon_for(BREAKER.format(urls=f'url = "{receiver.url}/in"'))
        post(daemon, 10)
        daemon.wait_log(lambda line: line.get("msg", "").startswith("circuit breaker open"))
        opened = time.monotonic()
        endpoint = ctl_json(daemon.config_path, "status")["guards"]["out"]["endpoints"][0]
        assert endpoint["state"] in ("open", "half-open")
        wait_until(lambda: log_count(daemon, "circuit breaker half-open") >= 3, "three probes", timeout=10)
        open_for = time.monotonic() - opened
        probes = log_count(daemon, "circuit breaker half-open")
        assert probes <= open_for / 1.0 + 1, f"{probes} probes in {open_for:.1f}s with a 1s cool-down"
        assert all(state == PENDING for _, _, state, _ in deliveries(daemon.config_path.parent)), (
            "max_attempts = 3, yet nothing is dead-lettered while the breaker is open"
        )

        switch.down.clear()
        assert wait_delivered(daemon, 10)
        rows = deliveries(daemon.config_path.parent)
        assert sum(attempts for *_, attempts in rows) == len(receiver.snapshot()), (
            "every attempt is a request"
        )
        # Before it opened: the failures that opened it (and one more in flight); then only probes.
        assert switch.refused <= 3 + 1 + probes + 1, f"{switch.refused} refused requests, {probes} probes"
        endpoint = ctl_json(daemon.config_path, "status")["guards"]["out"]["endpoints"][0]
        assert (endpoint["state"], endpoint["opens"] >= 1) == ("closed", True)
    finally:
        receiver.stop()


def test_failover_sends_to_the_secondary_while_the_primary_is_down_and_back_after(daemon_for: Make) -> None:
    health = Switch()
    primary, secondary = FakeReceiver(health).start(), FakeReceiver().start()
    try:
        health.down.set()
        daemon = daemon_for(BREAKER.format(urls=f'urls = ["{primary.url}/in", "{secondary.url}/in"]'))
        post(daemon, 10)
        assert wait_delivered(daemon, 10)
        keys = {r.headers["idempotency-key"] for r in secondary.snapshot()}
        assert len(keys) == 10, "the secondary took every delivery, the failed ones on their retry"
        assert health.refused <= 3 + 1, "the primary's breaker opened after `failures`"
        endpoints = ctl_json(daemon.config_path, "status")["guards"]["out"]["endpoints"]
        assert [e["state"] for e in endpoints] == ["open", "closed"]

        health.down.clear()

        def probe_due() -> bool:
            first = ctl_json(daemon.config_path, "status")["guards"]["out"]["endpoints"][0]
            return bool(first["state"] != "open" or first["retry_in_s"] == 0)  # JSON: Any to bool

        wait_until(probe_due, "the primary's cool-down over", timeout=10)
        post(daemon, 1)  # the primary's probe
        daemon.wait_log(lambda line: line.get("msg", "").startswith("circuit breaker closed"), timeout=10)
        before = len(secondary.snapshot())
        post(daemon, 5)
        assert wait_delivered(daemon, 16)
        assert len(secondary.snapshot()) == before, "back on the primary once it recovered"
        assert sum(r.method == "POST" for r in primary.snapshot()) >= 6
    finally:
        primary.stop()
        secondary.stop()


class Crowded:
    """A receiver that takes 30 ms per request and answers 503 to more than `capacity` at once.

    Until it has turned one away, the requests it took wait for that (at most 30 s): the sink's
    concurrency, not the pace of the test's posts, overloads it. With only the 30 ms a loaded
    machine posted slower than four a service time, and nothing was ever refused."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.now, self.refused = capacity, 0, 0
        self.lock = threading.Lock()
        self.overloaded = threading.Event()

    def __call__(self, request: Received) -> Reply:
        with self.lock:
            if self.now >= self.capacity:
                self.refused += 1
                self.overloaded.set()
                return 503, {}, b'{"error":"busy"}'
            self.now += 1
        try:
            self.overloaded.wait(30)
            time.sleep(0.03)  # the receiver's service time, not a wait in the test
            return ok(request)
        finally:
            with self.lock:
                self.now -= 1


ADAPTIVE = """
[telemetry]
metrics = false
prometheus = true
metrics_interval = "200ms"

[sources.demo]
type = "webhook"

[sinks.out]
type = "http"
inputs = ["demo"]
url = "{url}/in"
concurrency = "adaptive"
adaptive = {{ floor = 1, ceiling = 32, initial = 16 }}
breaker = {{ failures = 1000, rate = 1.0, min_requests = 1000 }}
retry = {{ max_attempts = 50, initial_backoff = "50ms", max_backoff = "200ms" }}
"""


def test_adaptive_concurrency_backs_off_from_an_overloaded_receiver_and_shows_its_limit(
    daemon_for: Make,
) -> None:
    crowded = Crowded(capacity=4)
    receiver = FakeReceiver(crowded).start()
    try:
        daemon = daemon_for(ADAPTIVE.format(url=receiver.url))
        post(daemon, 60)
        assert wait_delivered(daemon, 60)
        assert crowded.refused > 0, "the receiver was never overloaded: the test proves nothing"
        guard = ctl_json(daemon.config_path, "status")["guards"]["out"]
        assert guard["adaptive"]
        assert guard["concurrency"] < 16, "503s from a crowded receiver must lower the limit"
        metrics = httpx.get(f"{daemon.url}/metrics").text
        assert f'ferry_sink_concurrency{{sink="out"}} {guard["concurrency"]}' in metrics.replace(".0\n", "\n")
        assert f'ferry_breaker_state{{sink="out",url="{receiver.url}/in"}} 0' in metrics.replace(".0\n", "\n")
    finally:
        receiver.stop()
