"""A failing receiver with a backlog: the real daemon logs one retry warning per sink per 10 s.

Before, every failed attempt logged a warning (~2,200 lines/s with 100k pending, issue 13). Here
16 workers retry 400 deliveries every few tens of milliseconds against a receiver answering 503;
the warnings must stay at one per interval, and together count every failed attempt.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from actors.sink.retry_log import SUMMARY_INTERVAL
from tests.fakes import Daemon, FakeReceiver, write_config

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "{url}/contacts"
concurrency = 16
retry = {{ max_attempts = 10000, initial_backoff = "10ms", max_backoff = "50ms", max_age = "1h" }}
"""
STORM = 1000
"""Failed attempts before the daemon is stopped: a line per attempt would be far over the bound."""


def test_retry_warnings_are_one_per_interval_and_count_every_failed_attempt(tmp_path: Path) -> None:
    receiver = FakeReceiver(lambda request: (503, {}, b"down for maintenance")).start()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    began = time.monotonic()
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(400):
                assert client.post("/hooks/demo", json={"n": n}).status_code == 202
        # A real storm, however long this machine takes to make it (under a second normally).
        receiver.wait_for(lambda seen: len(seen) >= STORM, timeout=120)
        summary = daemon.wait_log(
            lambda line: line.get("msg") == "delivery will be retried" and line.get("interval_s", 0) > 0,
            timeout=40,
        )
    finally:
        daemon.stop()
        receiver.stop()
    elapsed = time.monotonic() - began
    received = len(receiver.snapshot())
    logs = daemon.logs()
    warnings = [
        line for line in logs if line.get("level") == "warning" and line.get("logger") == "ferry.sink"
    ]
    # One line at once, one per interval while the failures go on, the rest at stop: the failures
    # lasted under `elapsed`, so that many lines at most (3 in the usual 12 s).
    assert 2 <= len(warnings) <= 2 + elapsed // SUMMARY_INTERVAL, f"{len(warnings)} lines in {elapsed:.1f}s"
    assert received >= STORM
    assert summary["interval_s"] > SUMMARY_INTERVAL / 2, summary  # the first line after the one at once
    assert summary["by_error"] == {"503": summary["deliveries"]}
    assert summary["error"] == "HTTP 503: down for maintenance"
    counted = sum(line["attempts"] for line in warnings)
    # Every failed attempt is in a line; at most one per worker was cut off by the stop.
    assert received - 16 <= counted <= received, (counted, received)
    print(f"\n{received} failed attempts in {elapsed:.1f}s, {len(warnings)} warning lines")
