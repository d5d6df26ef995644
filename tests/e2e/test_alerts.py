"""Alerting in the real daemon: fires, survives kill -9 without notifying again, resolves; ctl alerts."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, write_config

CONFIG = """
[control]
socket = "{socket}"

[telemetry]
metrics = false

[alerting]
interval = "200ms"

[channels.ops]
type = "webhook"
url = "{ops}/alerts"

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "{crm}/contacts"
retry = {{ max_attempts = 1000, initial_backoff = "100ms", max_backoff = "200ms" }}

[alerts.crm_backlog]
expr = 'ferry.queue.depth{{stage="crm"}} > 0'
severity = "critical"
notify = [{{ channel = "ops" }}, {{ channel = "log", after = "1h" }}]
{extra}
"""


def wait(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def alert(config: Path) -> dict[str, Any]:
    alerts: list[dict[str, Any]] = ctl_json(config, "alerts")["alerts"]
    (found,) = [a for a in alerts if a["name"] == "crm_backlog"]
    return found


def stored_steps(db: Path) -> list[int]:
    """The escalation steps the store has as notified for the rule (what a restart resumes from)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT state FROM alerts WHERE rule = 'crm_backlog'").fetchone()
    return list(json.loads(row[0])["notified"]) if row else []


def test_an_alert_fires_once_survives_kill_9_and_resolves(tmp_path: Path, sock_dir: Path) -> None:
    crm_up = False

    def crm(_: Received) -> Reply:
        return (200, {}, b"ok") if crm_up else (503, {}, b"down")

    ops, sink = FakeReceiver().start(), FakeReceiver(responder=crm).start()
    body = CONFIG.format(socket=sock_dir / "ferry.sock", ops=ops.url, crm=sink.url, extra="")
    config = write_config(tmp_path, body)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 1}).status_code == 202
        fired = ops.wait_for(lambda seen: len(seen) >= 1)[0].json()
        assert (fired["alert"], fired["status"], fired["severity"], fired["value"]) == (
            "crm_backlog",
            "firing",
            "critical",
            1.0,
        )
        # The fake records the notification before it answers; the alerter marks the step
        # notified once the answer is in and stores that after the sends: a kill before the
        # commit would rightly notify again (at least once), so the kill waits for the commit.
        wait(lambda: stored_steps(tmp_path / "state" / "ferry.db") == [0], "the notified step stored")
        shown = alert(config)
        assert (shown["state"], shown["since"], shown["notified"]) == ("firing", fired["since"], ["ops"])
        assert shown["next_step"] == "log after 3600s"

        daemon.kill9()
        restarted_at = time.time()
        daemon = Daemon(config, tmp_path / "ferry.log").start()
        wait(lambda: (alert(config)["evaluated_at"] or 0) > restarted_at + 1, "evaluations after restart")
        after = alert(config)
        assert (after["state"], after["since"], after["fired"]) == ("firing", fired["since"], 1)
        assert len(ops.snapshot()) == 1  # the restart did not notify again

        human = ctl(config, "alerts")
        assert human.returncode == 0
        assert "crm_backlog  FIRING" in human.stdout
        assert "1 firing, 0 pending, 1 rule(s)" in human.stdout

        crm_up = True
        resolved = ops.wait_for(lambda seen: len(seen) >= 2)[1].json()
        assert (resolved["status"], resolved["since"], resolved["value"]) == ("resolved", fired["since"], 0.0)
        settled = alert(config)
        assert settled["state"] == "ok"
        # Five more evaluations (200 ms apart) after the resolution must notify nobody again.
        wait(lambda: alert(config)["evaluated_at"] >= settled["evaluated_at"] + 1.0, "five more evaluations")
        assert len(ops.snapshot()) == 2
    finally:
        daemon.stop()
        ops.stop()
        sink.stop()


def test_a_bad_rule_refuses_the_reload_with_its_path_and_a_good_one_is_applied(
    tmp_path: Path, sock_dir: Path
) -> None:
    ops, sink = FakeReceiver().start(), FakeReceiver().start()
    text = CONFIG.format(socket=sock_dir / "ferry.sock", ops=ops.url, crm=sink.url, extra="")
    config = write_config(tmp_path, text)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        original = config.read_text()
        config.write_text(
            original + "\n[alerts.typo]\nexpr = 'ferry.queue.dpth > 1'\nnotify = [{channel = 'log'}]\n"
        )
        refused = ctl(config, "--socket", str(sock_dir / "ferry.sock"), "reload")
        assert refused.returncode == 1
        assert "$.alerts.typo.expr: unknown metric 'ferry.queue.dpth'" in refused.stderr
        socket = ("--socket", str(sock_dir / "ferry.sock"))
        assert [a["name"] for a in ctl_json(config, *socket, "alerts")["alerts"]] == ["crm_backlog"]

        config.write_text(
            original
            + "\n[alerts.restarts]\nexpr = 'ferry.actor.restarts > 0'\nnotify = [{channel = 'log'}]\n"
        )
        applied = ctl_json(config, "reload")
        assert "alerts" in applied["changed"]
        assert sorted(a["name"] for a in ctl_json(config, "alerts")["alerts"]) == ["crm_backlog", "restarts"]
    finally:
        daemon.stop()
        ops.stop()
        sink.stop()
