"""The CRM sync example: its config checks, its fakes enforce what the real APIs do, and a short
run of its scenario (real ferry process, real HTTP) ends 100 % consistent with no valid event lost."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from tests.fakes import Daemon, ctl_json, until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "crm-sync"


def fakes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_crms", EXAMPLE / "fake_crms.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fake_crms", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_example_config_is_valid() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "-c", str(EXAMPLE / "ferry.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_fake_hubspot_validates_batches_and_enforces_its_quota() -> None:
    module = fakes()
    hubspot = module.FakeHubSpot().start()
    path = module.FakeHubSpot.PATH

    def item(email: str) -> dict[str, object]:
        return {"idProperty": "email", "id": email, "properties": {"email": email}}

    try:
        with httpx.Client(base_url=hubspot.url) as client:
            assert client.post(path, json={"inputs": [item("a@x.io")]}).status_code == 200
            twice = client.post(path, json={"inputs": [item("a@x.io"), item("a@x.io")]})
            assert twice.status_code == 400
            assert "Duplicate IDs" in twice.json()["message"]
            many = client.post(path, json={"inputs": [item(f"{n}@x.io") for n in range(101)]})
            assert many.status_code == 400
            statuses = [client.post(path, json={"inputs": [item("b@x.io")]}).status_code for _ in range(100)]
    finally:
        hubspot.stop()
    assert statuses.count(200) == 100 - 3, "100 requests per rolling 10 s, the three above included"
    assert statuses[-3:] == [429, 429, 429]
    assert hubspot.state["b@x.io"] == {"email": "b@x.io"}


def test_a_short_scenario_ends_fully_consistent(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    args = [
        "--contacts",
        "30",
        "--rate",
        "40",
        "--warmup",
        "1",
        "--burst",
        "40",
        "--settle",
        "1",
        "--storm",
        "1.5",
    ]
    args += ["--outage", "3", "--cooldown", "1", "--retry-cap", "1s", "--json", str(figures_path)]
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "scenario.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    for name in ("hubspot", "custom_crm"):
        assert figures["consistency"][name]["consistency_pct"] == 100.0
        assert figures["latency"][name]["never_synced"] == 0
        assert figures["latency"][name]["steady"]["sends"] > 0
        assert figures["ferry_stats"][name].get("stale", 0) > 0, "out-of-order updates were dropped as stale"
    assert figures["errors"]["valid_dead_lettered"] == 0
    assert figures["errors"]["invalid_dead_lettered"] == 5
    assert figures["hubspot_quota"]["answered_429"] >= 1, "the storm happened"
    assert figures["hubspot_quota"]["max_requests_in_10s"] <= 100
    assert figures["custom_crm"]["answered_503"] >= 1, "the outage happened"
    assert figures["traffic"]["duplicates_same_id"] > 0
    assert figures["traffic"]["reordered_pairs"] > 0


def example_config(folder: Path, hubspot: Any, crm: Any, salesforce: Any) -> Path:
    """examples/crm-sync/ferry.toml with this test's ports, store and socket (as scenario.py does)."""
    text = (EXAMPLE / "ferry.toml").read_text()
    text = text.replace("127.0.0.1:8080", "127.0.0.1:0")  # the daemon's `ready` line names the port
    for default, api in (("9101", hubspot), ("9102", crm), ("9103", salesforce)):
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{api.port}")
    text = text.replace('path = "var/crm-sync.db"', f'path = "{folder}/crm-sync.db"')
    text = text.replace('socket = "var/crm-sync.sock"', f'socket = "{folder}/ctl.sock"')
    text = text.replace(
        'initial_backoff = "500ms", max_backoff = "15s"', 'initial_backoff = "200ms", max_backoff = "1s"'
    )
    path = folder / "ferry.toml"
    path.write_text(text)
    return path


def test_contacts_hubspot_refuses_in_a_207_retry_or_dead_letter_alone(tmp_path: Path) -> None:
    """The real daemon on the example config: HubSpot answers 207 refusing an invalid email (for
    good) and another contact (once); the refused are settled on their own, the rest written once."""
    module = fakes()
    hubspot = module.FakeHubSpot().start()
    crm = module.FakeCrm().start()
    salesforce = module.FakeSalesforce(module.accounts(2)).start()
    config = example_config(tmp_path, hubspot, crm, salesforce)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    good = ["ada@example.com", "grace@example.com", "alan@example.com"]
    invalid, flaky = "bad@example.invalid", "edsger@example.com"
    hubspot.refuse_once(flaky)
    try:
        with httpx.Client(base_url=daemon.url) as client:
            for n, email in enumerate([*good, invalid, flaky]):
                record = {
                    "Id": f"003{n:012d}AAA",
                    "Email": email,
                    "FirstName": "A",
                    "LastName": "B",
                    "AccountId": "001000000000001AAA",
                    "LastModifiedDate": "2026-12-06T06:00:00.000+0000",
                }
                sent = client.post(
                    "/hooks/salesforce",
                    json={"event": "contact.created", "sobject": record},
                    headers={"X-Notification-Id": f"04l{n:012d}"},
                )
                assert sent.status_code == 202, sent.text
        until(lambda: set(hubspot.state), lambda state: state == {*good, flaky}, timeout=60)
        listing = until(
            lambda: ctl_json(config, "dlq", "list", "--sink", "hubspot"),
            lambda listing: listing["total"] == 1,
            timeout=30,
        )
        stages = until(
            lambda: ctl_json(config, "stats")["stages"]["hubspot"],
            lambda stage: stage["pending"] == 0,
            timeout=30,
        )
    finally:
        daemon.stop()
        for api in (hubspot, crm, salesforce):
            api.stop()
    [letter] = listing["items"]
    assert letter["last_status"] == 400
    assert "item refused (HTTP 400): VALIDATION_ERROR: Property values were not valid" in letter["last_error"]
    assert "Email address bad@example.invalid is invalid" in letter["last_error"]
    assert letter["attempts"] == 1, "a permanent refusal is not retried"
    writes = [write.key for write in hubspot.writes]
    assert sorted(writes) == sorted([*good, flaky]), "each accepted contact written exactly once"
    assert hubspot.inputs.count(flaky) == 2, "the transient refusal was retried, alone"
    assert all(hubspot.inputs.count(email) == 1 for email in good), "accepted contacts were not re-sent"
    assert hubspot.inputs.count(invalid) == 1
    assert stages == {"pending": 0, "delivered": 4, "dead": 1}
    assert set(crm.state) == {*good, invalid, flaky}, "the other sink is unaffected"
