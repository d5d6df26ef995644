"""A transform's dead letters through the real daemon: what failed, how often, and a retry that
runs the event through the transform again (issue 13, Low)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, until, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.contacts]
type = "webhook"

[transforms.enriched]
inputs = ["contacts"]
map = '{{id, company: .account.name}}'

[transforms.enriched.enrich]
url = "{lookups}/accounts/{{.account_id}}"
merge = ". + {{account: $lookup}}"
retry = {{ max_attempts = 3, initial_backoff = "20ms", max_backoff = "50ms" }}

[sinks.crm]
type = "http"
inputs = ["enriched"]
url = "{sink}/contacts"
"""


class Accounts:
    """GET /accounts/ID answers 503 until `heal()`."""

    def __init__(self) -> None:
        self.healed = threading.Event()

    def __call__(self, request: Received) -> Reply:
        if not self.healed.is_set():
            return 503, {}, b"down"
        return 200, {}, json.dumps({"name": request.path.rsplit("/", 1)[-1].title()}).encode()


@pytest.fixture
def accounts() -> Accounts:
    return Accounts()


@pytest.fixture
def receivers(accounts: Accounts) -> Iterator[tuple[FakeReceiver, FakeReceiver]]:
    lookups, sink = FakeReceiver(accounts).start(), FakeReceiver().start()
    yield lookups, sink
    lookups.stop()
    sink.stop()


def test_a_failed_lookup_shows_what_failed_and_a_retry_runs_the_transform_again(
    tmp_path: Path, sock_dir: Path, accounts: Accounts, receivers: tuple[FakeReceiver, FakeReceiver]
) -> None:
    """Old code: `"attempts": 1` beside "after 3 attempts", `event_id` null, and `dlq retry`
    refused the transform's dead letter (only a sink's could be retried)."""
    lookups, sink = receivers
    body = PIPELINE.format(socket=sock_dir / "ferry.sock", lookups=lookups.url, sink=sink.url)
    config = write_config(tmp_path, body)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        answer = httpx.post(f"{daemon.url}/hooks/contacts", json={"id": 7, "account_id": "acme"}, timeout=10)
        assert answer.status_code == 202
        event_id = answer.json()["id"]
        listing = until(lambda: ctl_json(config, "dlq", "list"), lambda got: got["items"])
        (letter,) = listing["items"]
        assert "after 3 attempts" in letter["last_error"]
        assert letter["attempts"] == 3
        assert letter["event_id"] == event_id
        shown = ctl_json(config, "dlq", "show", letter["id"])
        assert shown["delivery"]["payload"] == {"id": 7, "account_id": "acme"}

        accounts.healed.set()
        retried = ctl(config, "dlq", "retry", letter["id"])
        assert retried.returncode == 0, retried.stderr
        delivered = sink.wait_for(lambda got: len(got) >= 1)
        assert [request.json() for request in delivered] == [{"id": 7, "company": "Acme"}]
        until(
            lambda: ctl_json(config, "status")["stages"]["enriched"],
            lambda stage: stage["pending"] == 0 and stage["dead"] == 0,
        )
        assert ctl_json(config, "dlq", "list")["total"] == 0
    finally:
        daemon.stop()
