"""Validation, routing and confirmation through the real daemon process, with `ferry ctl` as a subprocess."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false
mask = ["email"]

[control]
socket = "{socket}"

[sources.sf]
type = "webhook"

[transforms.contact]
inputs = ["sf"]
schema = "contact.schema.json"
map = '{{type, email, name}}'
routes = [
  {{ when = '.type == "lead"', to = ["crm"] }},
  {{ when = '.type == "contact"', to = ["hubspot", "crm"] }},
]
default_route = ["crm"]

[sinks.hubspot]
type = "http"
inputs = ["contact"]
url = "{hubspot}/contacts"
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "100ms" }}

[sinks.crm]
type = "http"
inputs = ["contact"]
url = "{crm}/records"
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "100ms" }}
"""

SCHEMA = {
    "type": "object",
    "required": ["type", "email", "name"],
    "properties": {
        "type": {"enum": ["lead", "contact", "other"]},
        "email": {"type": "string", "format": "email"},
        "name": {"type": "string", "minLength": 1},
    },
}


def hubspot_answer(request: Received) -> Reply:
    # Echoes the email: the logged and shown excerpt must have it masked.
    body = {"id": "hs-1", "email": request.json()["email"]}
    return 201, {}, json.dumps(body, separators=(",", ":")).encode()


def crm_answer(request: Received) -> Reply:
    if request.json()["name"] == "Refused":
        return 422, {}, b'{"error":"duplicate record"}'
    return 200, {}, b'{"ok":true}'


@pytest.fixture
def receivers() -> Iterator[tuple[FakeReceiver, FakeReceiver]]:
    hubspot, crm = FakeReceiver(hubspot_answer).start(), FakeReceiver(crm_answer).start()
    yield hubspot, crm
    hubspot.stop()
    crm.stop()


@pytest.fixture
def daemon(tmp_path: Path, sock_dir: Path, receivers: tuple[FakeReceiver, FakeReceiver]) -> Iterator[Daemon]:
    hubspot, crm = receivers
    (tmp_path / "contact.schema.json").write_text(json.dumps(SCHEMA))
    config = write_config(
        tmp_path, PIPELINE.format(socket=sock_dir / "ferry.sock", hubspot=hubspot.url, crm=crm.url)
    )
    process = Daemon(config, tmp_path / "ferry.log").start()
    yield process
    process.stop()


def post(daemon: Daemon, body: Any) -> str:
    response = httpx.post(f"{daemon.url}/hooks/sf", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_routes_validation_and_per_event_outcomes(
    daemon: Daemon, receivers: tuple[FakeReceiver, FakeReceiver]
) -> None:
    hubspot, crm = receivers
    contact = post(daemon, {"type": "contact", "email": "ada@example.com", "name": "Ada"})
    lead = post(daemon, {"type": "lead", "email": "alan@example.com", "name": "Alan"})
    refused = post(daemon, {"type": "other", "email": "grace@example.com", "name": "Refused"})
    invalid = post(daemon, {"type": "robot", "email": "not-an-email", "name": ""})

    crm.wait_for(lambda seen: len(seen) == 3, timeout=20)
    hubspot.wait_for(lambda seen: len(seen) == 1, timeout=20)
    assert [r.json()["name"] for r in hubspot.snapshot()] == ["Ada"]
    assert sorted(r.json()["name"] for r in crm.snapshot()) == ["Ada", "Alan", "Refused"]

    # Every final outcome is one log line, with ids; the receiver's echo of the email is masked.
    config = daemon.config_path
    daemon.wait_log(lambda line: line.get("msg") == "delivery dead-lettered")
    deadline = time.monotonic() + 20
    while len(delivered := [line for line in daemon.logs() if line.get("msg") == "delivered"]) < 3:
        assert time.monotonic() < deadline, delivered
        time.sleep(0.02)
    assert sorted(line["delivery_id"] for line in delivered) == sorted(
        [f"{contact}.contact.hubspot", f"{contact}.contact.crm", f"{lead}.contact.crm"]
    )
    [to_hubspot] = [line for line in delivered if line["sink"] == "hubspot"]
    assert to_hubspot["event_id"] == f"{contact}.contact"
    assert (to_hubspot["status"], to_hubspot["attempts"]) == (201, 1)
    assert to_hubspot["response"] == '{"id":"hs-1","email":"***"}'
    assert to_hubspot["latency_ms"] >= 0
    assert "ada@example.com" not in (daemon.log_path.read_text())
    [dead] = [line for line in daemon.logs() if line.get("msg") == "delivery dead-lettered"]
    assert (dead["delivery_id"], dead["status"]) == (f"{refused}.contact.crm", 422)

    # Per event: each sink's outcome, queryable by the id the webhook answered.
    report = ctl_json(config, "event", contact)
    assert [event["id"] for event in report["events"]] == [contact, f"{contact}.contact"]
    outcomes = {d["stage"]: d for d in report["events"][1]["deliveries"]}
    assert set(outcomes) == {"hubspot", "crm"}
    assert outcomes["hubspot"]["state"] == "delivered"
    assert (outcomes["hubspot"]["status"], outcomes["hubspot"]["attempts"]) == (201, 1)
    assert outcomes["hubspot"]["response"] == '{"id":"hs-1","email":"***"}'
    assert outcomes["hubspot"]["latency_s"] > 0
    assert outcomes["crm"]["response"] == '{"ok":true}'
    assert report["events"][1]["payload"]["email"] == "***"

    shown = ctl(config, "event", refused)
    assert shown.returncode == 0, shown.stderr
    assert f"event {refused}.contact  stream contact" in shown.stdout
    [row] = [line for line in shown.stdout.splitlines() if line.strip().startswith("crm")]
    assert row.split()[:4] == ["crm", "dead", "1", "422"]
    assert 'HTTP 422: {"error":"duplicate record"}' in row

    # The invalid event never reached a sink: dead-lettered by the transform, every violation listed.
    letter = ctl_json(config, "dlq", "show", f"{invalid}.contact")
    assert letter["state"] == "dead"
    assert letter["delivery"]["sink"] == "contact"
    assert letter["delivery"]["last_error"] == (
        "schema: 3 violation(s): $.email: '***' is not a 'email'; "
        "$.name: '' should be non-empty; $.type: 'robot' is not one of ['lead', 'contact', 'other']"
    )
    human = ctl(config, "dlq", "show", f"{invalid}.contact").stdout
    assert "$.type: 'robot' is not one of" in human

    missing = ctl(config, "event", "0" * 27)
    assert missing.returncode == 1
    assert "no stored event with id '000000000000000000000000000'" in missing.stderr
