"""The CRM sync example: its config checks, its fakes enforce what the real APIs do, and a short
run of its scenario (real ferry process, real HTTP) ends 100 % consistent with no valid event lost."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx

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
