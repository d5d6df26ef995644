"""`ferry ctl` as a real subprocess against the real daemon process."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import HTTP, ROOT, Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
concurrency = 4
retry = {{ max_attempts = 20, initial_backoff = "50ms", max_backoff = "200ms" }}

[sinks.witness]
type = "file"
inputs = ["shape"]
path = "witness.jsonl"
"""


class Receiver(FakeReceiver):
    """The fake receiver with a switchable answer per event id and an optional gate."""

    def __init__(self) -> None:
        super().__init__(responder=self._respond)
        self.rejected: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()

    def _respond(self, request: Received) -> Reply:
        self.gate.wait(30)
        if request.json()["id"] in self.rejected:
            return 422, {}, b'{"error":"unprocessable contact"}'
        return 200, {}, b"{}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    fake = Receiver()
    fake.start()
    yield fake
    fake.gate.set()
    fake.stop()


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path, receiver: Receiver) -> Path:
    return write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url))


@pytest.fixture
def daemon(config: Path, tmp_path: Path) -> Iterator[Daemon]:
    process = Daemon(config, tmp_path / "ferry.log").start()
    yield process
    process.stop()


def post(daemon: Daemon, n: int) -> httpx.Response:
    return HTTP.post(f"{daemon.url}/hooks/demo", json={"id": n})


def wait_status(config: Path, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Poll `ferry ctl status` until `predicate(status)` holds (the daemon's own account)."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = ctl_json(config, "status")
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"status never satisfied the condition: {status['stages']}"
        time.sleep(0.05)


def test_status_reports_actors_stages_and_config_and_a_stopped_daemon_exits_3(
    config: Path, tmp_path: Path
) -> None:
    down = ctl(config, "status")
    assert down.returncode == 3
    assert "ferry is not running" in down.stderr
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        human = ctl(config, "status")
        assert human.returncode == 0, human.stderr
        assert f"config   {config.resolve()}" in human.stdout
        assert "sink.crm" in human.stdout
        assert "STAGE" in human.stdout
        status = ctl_json(config, "status")
        states = {a["name"]: a["state"] for a in status["actors"]}
        assert {"sink.crm", "sink.witness", "transform.shape", "ingest", "listener"} <= set(states)
        assert set(states.values()) == {"running"}
        assert all(a["restarts"] == 0 and a["last_error"] is None for a in status["actors"])
        assert status["stages"]["crm"] == {
            "kind": "sink",
            "pending": 0,
            "delivered": 0,
            "dead": 0,
            "paused": False,
        }
        assert status["config_path"] == str(config.resolve())
        assert len(status["config_sha256"]) == 64
        assert status["paused"] == []
    finally:
        daemon.stop()
    assert ctl(config, "status").returncode == 3


def test_a_paused_source_answers_503_and_stores_nothing_until_resumed(config: Path, daemon: Daemon) -> None:
    paused = ctl(config, "pause", "demo")
    assert (paused.returncode, paused.stdout) == (0, "source demo paused\n")
    refused = post(daemon, 1)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.json() == {"error": "source demo is paused"}
    status = ctl_json(config, "status")
    assert status["paused"] == ["demo"]
    assert status["stages"]["shape"]["pending"] == 0
    assert status["stages"]["witness"] == {
        "kind": "sink",
        "pending": 0,
        "delivered": 0,
        "dead": 0,
        "paused": False,
    }
    assert ctl(config, "resume", "demo").stdout == "source demo resumed\n"
    assert post(daemon, 2).status_code == 202


def test_a_paused_sink_keeps_its_deliveries_pending_and_delivers_them_on_resume(
    config: Path, daemon: Daemon, receiver: Receiver
) -> None:
    assert ctl(config, "pause", "crm").stdout == "sink crm paused\n"
    for n in range(10):
        assert post(daemon, n).status_code == 202
    # The unpaused sink on the same input is the witness: once it has delivered all ten,
    # the paused one has had every chance to send them too.
    status = wait_status(config, lambda s: s["stages"]["witness"]["delivered"] == 10)
    assert status["stages"]["crm"] == {
        "kind": "sink",
        "pending": 10,
        "delivered": 0,
        "dead": 0,
        "paused": True,
    }
    assert status["paused"] == ["crm"]
    assert receiver.snapshot() == []
    assert ctl(config, "resume", "crm").stdout == "sink crm resumed\n"
    seen = receiver.wait_for(lambda requests: len(requests) >= 10, timeout=20)
    assert sorted(r.json()["id"] for r in seen) == list(range(10))
    wait_status(config, lambda s: s["stages"]["crm"]["delivered"] == 10)


def test_dlq_list_show_retry_purge_stats_and_audit(config: Path, daemon: Daemon, receiver: Receiver) -> None:
    receiver.rejected = {1, 2}
    ids = {n: post(daemon, n).json()["id"] for n in range(4)}
    wait_status(config, lambda s: s["stages"]["crm"]["dead"] == 2 and s["stages"]["crm"]["delivered"] == 2)

    listing = ctl_json(config, "dlq", "list", "--sink", "crm")
    assert listing["total"] == 2
    dead = {item["id"]: item for item in listing["items"]}
    first, second = f"{ids[1]}.shape.crm", f"{ids[2]}.shape.crm"
    assert set(dead) == {first, second}
    assert dead[first]["last_status"] == 422
    assert "unprocessable contact" in dead[first]["last_error"]
    assert ctl_json(config, "dlq", "list", "--error", "UNPROCESSABLE", "--since", "1h")["total"] == 2
    assert ctl_json(config, "dlq", "list", "--error", "timeout")["total"] == 0
    human = ctl(config, "dlq", "list")
    assert first in human.stdout
    assert "2 of 2 dead letter(s)" in human.stdout

    shown = ctl(config, "dlq", "show", first)
    assert shown.returncode == 0, shown.stderr
    assert "state        dead" in shown.stdout
    assert '"id": 1' in shown.stdout
    assert ctl_json(config, "dlq", "show", first)["delivery"]["payload"] == {"id": 1}
    missing = ctl(config, "dlq", "show", "nope")
    assert (missing.returncode, missing.stderr) == (1, "error: no delivery with id 'nope'\n")

    stats = ctl_json(config, "stats")
    assert stats["stages"]["crm"] == {"pending": 0, "delivered": 2, "dead": 2}
    assert {"stage": "crm", "state": "dead", "last_status": 422, "count": 2, "error_type": "http_422"} in (
        stats["failures"]
    )

    receiver.rejected = set()  # the receiver is fixed
    retried = ctl(config, "dlq", "retry", first)
    assert (retried.returncode, retried.stdout) == (0, "1 dead letter(s) pending again (crm 1)\n")
    requests = receiver.wait_for(
        lambda seen: any(r.json()["id"] == 1 and r.headers.get("idempotency-key") == first for r in seen[-1:])
    )
    again = [r for r in requests if r.headers["idempotency-key"] == first]
    assert len(again) == 2  # the refused attempt, then the retry with the same delivery id
    wait_status(config, lambda s: s["stages"]["crm"]["delivered"] == 3)

    no_tty = ctl(config, "dlq", "purge")
    assert no_tty.returncode == 2
    assert "refusing without --yes" in no_tty.stderr
    purged = ctl(config, "dlq", "purge", "--sink", "crm", "--yes")
    assert (purged.returncode, purged.stdout) == (0, "1 dead letter(s) purged\n")
    assert ctl_json(config, "dlq", "list")["total"] == 0
    assert ctl(config, "dlq", "retry").returncode == 2

    rows = ctl_json(config, "audit")["rows"]
    assert [(r["command"], r["outcome"]) for r in rows] == [
        ("dlq.retry", "ok: 1 retried"),
        ("dlq.purge", "ok: 1 purged"),
    ]
    assert json.loads(rows[0]["arguments"])["ids"] == [first]
    assert {r["uid"] for r in rows} == {os.getuid()}
    assert "dlq.purge" in ctl(config, "audit").stdout


def test_drain_stops_intake_delivers_the_backlog_and_the_daemon_exits_0(
    config: Path, daemon: Daemon, receiver: Receiver
) -> None:
    receiver.gate.clear()  # the receiver holds every request until the gate opens
    for n in range(20):
        assert post(daemon, n).status_code == 202
    drain = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), "drain", "--timeout", "30s"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert drain.stdout is not None
    first = drain.stdout.readline()
    assert first.startswith("draining: "), first
    assert "outstanding" in first
    refused = post(daemon, 99)  # intake is stopped while draining
    assert refused.status_code == 503
    receiver.gate.set()
    rest, errors = drain.communicate(timeout=30)
    assert drain.returncode == 0, errors
    assert "drained in" in rest
    assert daemon.wait(15) == 0
    assert sorted({r.json()["id"] for r in receiver.snapshot()}) == list(range(20))
    assert ctl(config, "status").returncode == 3


def test_a_drain_whose_client_goes_away_still_finishes_and_stops_the_daemon(
    config: Path, daemon: Daemon, receiver: Receiver, sock_dir: Path
) -> None:
    receiver.gate.clear()
    for n in range(5):
        assert post(daemon, n).status_code == 202
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock_dir / "ferry.sock"))
        client.sendall(b'{"v": 1, "cmd": "drain", "timeout": 30}\n')
        progress = json.loads(client.makefile().readline())
        assert progress["ok"] is True
        assert progress["progress"]["outstanding"] >= 1
    receiver.gate.set()
    assert daemon.wait(30) == 0
    assert sorted({r.json()["id"] for r in receiver.snapshot()}) == list(range(5))


def test_purge_on_a_terminal_asks_first(config: Path, daemon: Daemon, receiver: Receiver) -> None:
    receiver.rejected = {7}
    post(daemon, 7)
    wait_status(config, lambda s: s["stages"]["crm"]["dead"] == 1)

    def purge(answer: bytes) -> subprocess.CompletedProcess[bytes]:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer)
            return subprocess.run(
                [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), "dlq", "purge"],
                cwd=ROOT,
                stdin=terminal,
                capture_output=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(terminal)
            os.close(controller)

    declined = purge(b"n\n")
    assert declined.returncode == 1
    assert b"Purge 1 dead letter(s)? This cannot be undone. [y/N]" in declined.stdout
    assert ctl_json(config, "dlq", "list")["total"] == 1
    accepted = purge(b"y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.endswith(b"1 dead letter(s) purged\n")
    assert ctl_json(config, "dlq", "list")["total"] == 0


def test_stats_latency_percentiles_and_status_rates(config: Path, daemon: Daemon, receiver: Receiver) -> None:
    receiver.gate.clear()
    began = time.time()  # the daemon's clock for `created_at` and `finished_at`
    for n in range(4):
        assert post(daemon, n).status_code == 202
    wait_status(config, lambda s: s["stages"]["witness"]["delivered"] == 4)
    # Every delivery was created after `began` and each witness one finished by now, so no
    # witness latency exceeds `span`. The crm deliveries (created with the witness ones) are
    # held at least `held` past now: longer than any witness latency, however slow the machine.
    span = time.time() - began
    held = max(0.3, span)
    time.sleep(held)  # the stimulus: every crm delivery is held at least this long, not a wait for an event
    receiver.gate.set()
    wait_status(config, lambda s: s["stages"]["crm"]["delivered"] == 4)
    stats = ctl_json(config, "stats")
    crm = stats["latency"]["crm"]
    assert crm["count"] == 4
    assert held * 1000 <= crm["p50_ms"] <= crm["p90_ms"] <= crm["p99_ms"] <= crm["max_ms"] < 30_000
    witness = stats["latency"]["witness"]
    assert witness["count"] == 4
    assert witness["max_ms"] <= span * 1000 <= held * 1000 <= crm["p50_ms"]  # each sink's own latencies
    human = ctl(config, "stats")
    assert "P99 MS" in human.stdout
    status = ctl(config, "status")
    assert "rates    received" in status.stdout
    assert set(ctl_json(config, "status")) >= {"received_per_s", "delivered_per_s"}


def test_ctl_output_into_a_closed_pipe_is_not_an_error(config: Path, daemon: Daemon) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), "status"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        proc.stdout.close()  # like `| head -0`: the reader is gone before ferry writes
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
