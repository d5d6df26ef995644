"""A failing receiver with a backlog: the real daemon logs one retry warning per sink per 10 s.

Before, every failed attempt logged a warning (~2,200 lines/s with 100k pending, issue 13). Here
16 workers retry 400 deliveries every few tens of milliseconds against a receiver answering 503;
the warnings must stay at one per interval, and together count every failed attempt.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

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


def test_retry_warnings_are_one_per_interval_and_count_every_failed_attempt(tmp_path: Path) -> None:
    receiver = FakeReceiver(lambda request: (503, {}, b"down for maintenance")).start()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(400):
                assert client.post("/hooks/demo", json={"n": n}).status_code == 202
        began = time.monotonic()
        summary = daemon.wait_log(
            lambda line: line.get("msg") == "delivery will be retried" and line.get("interval_s", 0) > 5,
            timeout=40,
        )
        elapsed = time.monotonic() - began
    finally:
        daemon.stop()
        receiver.stop()
    received = len(receiver.snapshot())
    logs = daemon.logs()
    warnings = [
        line for line in logs if line.get("level") == "warning" and line.get("logger") == "ferry.sink"
    ]
    assert 2 <= len(warnings) <= 4, f"{len(warnings)} warnings"  # at once, each 10 s, the rest at stop
    assert summary["attempts"] >= 1000, summary  # a real storm was summarised
    assert summary["by_error"] == {"503": summary["deliveries"]}
    assert summary["error"] == "HTTP 503: down for maintenance"
    counted = sum(line["attempts"] for line in warnings)
    # Every failed attempt is in a line; at most one per worker was cut off by the stop.
    assert received - 16 <= counted <= received, (counted, received)
    print(f"\n{received} failed attempts in {elapsed:.1f}s+, {len(warnings)} warning lines")
