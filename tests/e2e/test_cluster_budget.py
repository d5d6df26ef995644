"""A rate budget shared by three real daemons on one PostgreSQL database, counted at the receiver.

Three `ferry run` processes with the same config (each its own listener and control socket),
webhooks posted round robin; every node's sink claims deliveries from the shared outbox and takes
its permits from the shared budget. The receiver must never see more than the budget allows,
together; and a `Retry-After` answered to one node holds the others back.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx

from bench.budget import most_in_window as most_in_any_window
from tests.daemon.limits.test_shared import blocked_in_database
from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, until, write_config
from tests.postgres import postgres_url

__all__ = ["postgres_url"]

RATE, BURST, EVENTS = 20, 2, 60

CONFIG = """
[rate_limits.api]
rate = {rate}
per = "1s"
burst = {burst}

[sources.hooks]
type = "webhook"

[sinks.out]
type = "http"
inputs = ["hooks"]
url = "{url}"
concurrency = 8
timeout = "2s"
rate_limit = "api"
retry = {{ max_attempts = 100, initial_backoff = "50ms", max_backoff = "200ms" }}
"""


def nodes(folder: Path, url: str, postgres_url: str, count: int = 3) -> list[Daemon]:
    started = []
    for i in range(count):
        home = folder / f"node{i}"
        home.mkdir()
        config = write_config(home, CONFIG.format(rate=RATE, burst=BURST, url=url))
        config.write_text(
            config.read_text().replace(
                '[store]\npath = "state/ferry.db"',
                '[store]\nbackend = "postgres"\nurl = "env:FERRY_DATABASE_URL"',
            )
            + f'\n[control]\nsocket = "{home}/ferry.sock"\n'
        )
        started.append(Daemon(config, home / "daemon.log", env={"FERRY_DATABASE_URL": postgres_url}).start())
    return started


def test_three_daemons_never_exceed_a_shared_budget_together(tmp_path: Path, postgres_url: str) -> None:
    receiver = FakeReceiver().start()
    daemons = nodes(tmp_path, receiver.url, postgres_url)
    try:
        with httpx.Client(timeout=10) as client:
            for n in range(EVENTS):
                answer = client.post(f"{daemons[n % 3].url}/hooks/hooks", json={"n": n})
                assert answer.status_code == 202, answer.text
        seen = receiver.wait_for(lambda seen: len({r.json()["n"] for r in seen}) >= EVENTS, timeout=60)
        shown = ctl(daemons[0].config_path, "status")
        assert f"{RATE}/1s cluster" in shown.stdout, shown.stdout
        budget = ctl_json(daemons[1].config_path, "status")["rate_limits"]["api"]
        assert budget["shared"] is True
        assert budget["round_trips"] > 0
    finally:
        for daemon in daemons:
            daemon.stop()
        receiver.stop()
    times = [r.at for r in seen]
    for window in (0.0, 0.25, 0.5, 1.0, max(times) - min(times)):
        # one permit of slack for the time between a grant and its request's arrival
        assert most_in_any_window(times, window) <= math.floor(BURST + RATE * window + 1), f"window {window}s"
    assert len(times) >= EVENTS


def test_a_retry_after_answered_to_one_daemon_holds_back_the_others(
    tmp_path: Path, postgres_url: str
) -> None:
    """The first request gets 429 + Retry-After: 2; nothing may arrive for the next ~2 s from any node."""
    refused_at: list[float] = []

    def first_refused(request: Received) -> Reply:
        if not refused_at:
            refused_at.append(time.time())
            return 429, {"retry-after": "2"}, b'{"error":"slow down"}'
        return 200, {}, b"{}"

    receiver = FakeReceiver(first_refused).start()
    daemons = nodes(tmp_path, receiver.url, postgres_url)
    try:
        with httpx.Client(timeout=10) as client:
            answer = client.post(f"{daemons[0].url}/hooks/hooks", json={"n": -1})
            assert answer.status_code == 202
            receiver.wait_for(lambda seen: bool(refused_at), timeout=30)
            until(lambda: blocked_in_database(postgres_url, "api"), bool, timeout=10)
            for n in range(12):
                assert client.post(f"{daemons[n % 3].url}/hooks/hooks", json={"n": n}).status_code == 202
        seen = receiver.wait_for(lambda seen: len({r.json()["n"] for r in seen}) >= 13, timeout=60)
    finally:
        for daemon in daemons:
            daemon.stop()
        receiver.stop()
    after = sorted(r.at for r in seen if r.at > refused_at[0])
    assert after, "nothing was delivered after the pause"
    # The pause reaches the other nodes through the database: one round trip, some milliseconds.
    assert after[0] - refused_at[0] >= 2.0 - 0.3, after[0] - refused_at[0]
