"""Enrichment end to end: the real daemon looking records up over real HTTP, across kill -9."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl_json, until, write_config

PIPELINE = """
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
cache_ttl = "5m"
retry = {{ max_attempts = 40, initial_backoff = "50ms", max_backoff = "200ms" }}

[sinks.crm]
type = "http"
inputs = ["enriched"]
url = "{sink}/contacts"
"""


class Accounts:
    """GET /accounts/ID: `acme` answers; `flaky` answers 503 until `heal()`; `forbidden` 403."""

    def __init__(self) -> None:
        self.healed = threading.Event()

    def __call__(self, request: Received) -> Reply:
        account = request.path.rsplit("/", 1)[-1]
        if account == "forbidden":
            return 403, {}, b'{"error":"not yours"}'
        if account == "flaky" and not self.healed.is_set():
            return 503, {}, b"down"
        return 200, {}, json.dumps({"name": account.title()}).encode()


@pytest.fixture
def accounts() -> Accounts:
    return Accounts()


@pytest.fixture
def lookups(accounts: Accounts) -> Iterator[FakeReceiver]:
    fake = FakeReceiver(accounts).start()
    yield fake
    fake.stop()


@pytest.fixture
def sink() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path, lookups: FakeReceiver, sink: FakeReceiver) -> Path:
    body = PIPELINE.format(socket=sock_dir / "ferry.sock", lookups=lookups.url, sink=sink.url)
    return write_config(tmp_path, body)


def post(client: httpx.Client, n: int, account: str) -> None:
    response = client.post("/hooks/contacts", json={"id": n, "account_id": account})
    assert response.status_code == 202, response.text


def test_a_burst_for_one_record_costs_one_lookup(
    config: Path, lookups: FakeReceiver, sink: FakeReceiver, tmp_path: Path
) -> None:
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(40):
                post(client, n, "acme")
            delivered = sink.wait_for(lambda got: len(got) >= 40)
    finally:
        daemon.stop()
    assert sorted(r.json()["id"] for r in delivered) == list(range(40))
    assert {r.json()["company"] for r in delivered} == {"Acme"}
    assert len(lookups.snapshot()) == 1


def test_a_retrying_lookup_survives_kill_9_and_a_refused_one_is_dead_lettered(
    config: Path, accounts: Accounts, lookups: FakeReceiver, sink: FakeReceiver, tmp_path: Path
) -> None:
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            post(client, 1, "flaky")
            post(client, 2, "forbidden")
            post(client, 3, "acme")
            lookups.wait_for(lambda got: sum(r.path.endswith("/flaky") for r in got) >= 3)
            daemon.kill9()  # mid-retry: nothing of this batch has committed
            accounts.healed.set()
            daemon.start()
            delivered = sink.wait_for(lambda got: {r.json()["id"] for r in got} >= {1, 3})
            letters = until(lambda: ctl_json(config, "dlq", "list"), lambda got: got["items"])
    finally:
        daemon.stop()

    assert {r.json()["id"]: r.json()["company"] for r in delivered} == {1: "Flaky", 3: "Acme"}
    (letter,) = letters["items"]
    assert letter["sink"] == "enriched"
    assert (
        letter["last_error"] == f'lookup {lookups.url}/accounts/forbidden: HTTP 403: {{"error":"not yours"}}'
    )
