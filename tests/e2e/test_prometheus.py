"""`GET /metrics` on the real daemon, parsed with prometheus_client's own parser."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import Daemon, FakeReceiver, Received, Reply, write_config

PIPELINE = """
[telemetry]
metrics = false
prometheus = {prometheus}
metrics_interval = "200ms"

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "{url}/contacts"
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "100ms" }}
"""


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(daemon: Daemon) -> Samples:
    response = httpx.get(f"{daemon.url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def wait_scrape(daemon: Daemon, predicate: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until `predicate` holds (outcomes are counted as their commits return)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(daemon)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched within {timeout}s: {samples}")
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_page_values_match_a_scripted_run(tmp_path: Path) -> None:
    received, dead, flaky = 7, {2, 5}, 4  # 2 dead (400), 1 retried once (503), 4 delivered first time
    seen_flaky: list[int] = []

    def respond(request: Received) -> Reply:
        n = request.json()["n"]
        if n in dead:
            return 400, {}, b"no"
        if n == flaky and not seen_flaky:
            seen_flaky.append(n)
            return 503, {}, b"later"
        return 200, {}, b"ok"

    sink = FakeReceiver(responder=respond).start()
    config = write_config(tmp_path, PIPELINE.format(prometheus="true", url=sink.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        for n in range(received):
            assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": n}).status_code == 202
        bad = httpx.post(
            f"{daemon.url}/hooks/demo", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        delivered = received - len(dead)
        samples = wait_scrape(
            daemon,
            lambda s: (
                value(s, "ferry_deliveries_total", sink="crm", outcome="delivered") == delivered
                and value(s, "ferry_deliveries_total", sink="crm", outcome="dead") == len(dead)
                and value(s, "ferry_queue_depth", stage="crm") == 0
            ),
        )
    finally:
        daemon.stop()
        sink.stop()
    assert value(samples, "ferry_events_received_total", source="demo") == received
    assert value(samples, "ferry_events_rejected_total", source="demo", reason="malformed_json") == 1
    assert value(samples, "ferry_deliveries_total", sink="crm", outcome="delivered") == delivered
    assert value(samples, "ferry_deliveries_total", sink="crm", outcome="dead") == len(dead)
    assert value(samples, "ferry_deliveries_total", sink="crm", outcome="retry") == 1
    assert value(samples, "ferry_dead_letters_total", stage="crm") == len(dead)
    assert value(samples, "ferry_delivery_attempts_total", sink="crm") == received + 1
    assert value(samples, "ferry_delivery_latency_seconds_count", sink="crm") == delivered
    assert value(samples, "ferry_delivery_latency_seconds_bucket", sink="crm", le="+Inf") == delivered
    assert value(samples, "ferry_queue_depth", stage="crm") == 0
    # process metrics: plausible values of this very process
    assert value(samples, "ferry_process_memory_rss_bytes") > 10 * 1024 * 1024
    assert 5 <= value(samples, "ferry_process_open_fds") < 1024
    assert value(samples, "ferry_process_cpu_time_seconds_total", mode="user") > 0


def test_metrics_page_is_404_unless_enabled(tmp_path: Path) -> None:
    sink = FakeReceiver().start()
    config = write_config(tmp_path, PIPELINE.format(prometheus="false", url=sink.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        response = httpx.get(f"{daemon.url}/metrics")
        post = httpx.post(f"{daemon.url}/metrics", json={})
    finally:
        daemon.stop()
        sink.stop()
    assert response.status_code == 404
    assert "prometheus = true" in response.json()["error"]
    assert post.status_code == 405
