"""Reload of the real daemon process: SIGHUP and `ferry ctl reload` as a subprocess."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_systemd_notify import NotifySocket
from tests.fakes import Daemon, ctl, ctl_json, write_config

BODY = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{{key}: .n}}'

[sinks.out]
type = "file"
inputs = ["shape"]
path = "out.jsonl"
"""
NEW_SINK = '\n[sinks.new]\ntype = "file"\ninputs = ["demo"]\npath = "new.jsonl"\n'


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    receiver = NotifySocket()
    yield receiver
    receiver.sock.close()


class Setup:
    def __init__(self, tmp_path: Path, sock_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.socket = sock_dir / "ferry.sock"
        self.config = write_config(tmp_path, self.body())
        self.port = self.config.read_text().split('address = "127.0.0.1:')[1].split('"')[0]

    def body(self, key: str = "old", extra: str = "") -> str:
        return BODY.format(socket=self.socket, key=key) + extra

    def rewrite(self, key: str = "old", extra: str = "", port: str | None = None) -> None:
        write_config(self.tmp_path, self.body(key, extra), port=int(port or self.port))

    def lines(self, name: str) -> list[dict[str, Any]]:
        file = self.tmp_path / name
        if not file.exists():
            return []
        return [json.loads(line)["event"] for line in file.read_text().splitlines()]


@pytest.fixture
def setup(tmp_path: Path, sock_dir: Path) -> Setup:
    return Setup(tmp_path, sock_dir)


def wait_lines(setup: Setup, name: str, count: int, daemon: Daemon) -> list[dict[str, Any]]:
    daemon.wait_log(lambda _: len(setup.lines(name)) >= count)
    return setup.lines(name)


def test_sighup_reloads_and_systemd_sees_reloading_then_ready(
    setup: Setup, notify: NotifySocket, tmp_path: Path
) -> None:
    daemon = Daemon(setup.config, tmp_path / "ferry.log", env={"NOTIFY_SOCKET": notify.address}).start()
    try:
        notify.until("READY=1")
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 1}).status_code == 202
        assert wait_lines(setup, "out.jsonl", 1, daemon) == [{"old": 1}]  # transformed before the reload
        setup.rewrite(key="new", extra=NEW_SINK)
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_log(lambda line: line.get("msg") == "config reloaded")
        assert reloaded["added"] == ["sinks.new"]
        assert reloaded["changed"] == ["sources.demo", "transforms.shape"]
        seen = notify.until("RELOADING=1")
        reloading = next(text for _, text in seen if "RELOADING=1" in text.split("\n"))
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
        notify.seen = notify.seen[notify.index("RELOADING=1") + 1 :]
        assert "STATUS=reloaded: 1 added, 2 changed, 0 removed" in notify.until("READY=1")[-1][1]
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 2}).status_code == 202
        assert wait_lines(setup, "new.jsonl", 1, daemon) == [{"n": 2}]
        assert wait_lines(setup, "out.jsonl", 2, daemon) == [{"old": 1}, {"new": 2}]
        status = ctl_json(setup.config, "status")
        assert {a["name"]: a["restarts"] for a in status["actors"]}["sink.out"] == 0
    finally:
        daemon.stop()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0


def test_ctl_reload_applies_a_good_file_and_refuses_a_bad_one_or_a_listener_change(
    setup: Setup, tmp_path: Path
) -> None:
    daemon = Daemon(setup.config, tmp_path / "ferry.log").start()
    try:
        before = ctl_json(setup.config, "status")["config_sha256"]
        setup.rewrite(extra=NEW_SINK)
        done = ctl(setup.config, "reload")
        assert done.returncode == 0, done.stderr
        assert f"reloaded {setup.config.resolve()} (sha256:" in done.stdout
        assert "  added    sinks.new\n" in done.stdout
        after = ctl_json(setup.config, "status")
        assert after["config_sha256"] != before
        assert after["stages"]["new"]["kind"] == "sink"

        setup.rewrite(
            extra=NEW_SINK + "\n[sinks.broken]\ntype = 'file'\ninputs = ['nowhere']\npath = 'b.jsonl'\n"
        )
        bad = ctl(setup.config, "reload")
        assert bad.returncode == 2  # ctl reads the (now invalid) file itself to find the socket
        bad = ctl(setup.config, "--socket", str(setup.socket), "reload")
        assert bad.returncode == 1
        assert bad.stderr.startswith("error: reload refused, nothing changed:\n")
        assert "$.sinks.broken.inputs[0]: unknown input 'nowhere'" in bad.stderr

        setup.rewrite(port="1")
        refused = ctl(setup.config, "reload")
        assert refused.returncode == 1
        assert "[listener] changed: restart ferry to apply" in refused.stderr
        assert ctl_json(setup.config, "status")["config_sha256"] == after["config_sha256"]
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 5}).status_code == 202
        assert wait_lines(setup, "new.jsonl", 1, daemon) == [{"n": 5}]
        outcomes = [(r["command"], r["outcome"][:30]) for r in ctl_json(setup.config, "audit")["rows"]]
        assert [command for command, _ in outcomes] == ["reload"] * 3
    finally:
        daemon.stop()


def test_removing_a_source_by_reload_makes_its_path_404(setup: Setup, tmp_path: Path) -> None:
    extra = '\n[sources.other]\ntype = "webhook"\n'
    setup.rewrite(extra=extra)
    daemon = Daemon(setup.config, tmp_path / "ferry.log").start()
    try:
        assert httpx.post(f"{daemon.url}/hooks/other", json={"n": 1}).status_code == 202
        setup.rewrite()
        assert ctl(setup.config, "reload").returncode == 0
        assert httpx.post(f"{daemon.url}/hooks/other", json={"n": 2}).status_code == 404
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 3}).status_code == 202
    finally:
        daemon.stop()


def test_reload_under_load_loses_no_event(setup: Setup, tmp_path: Path) -> None:
    daemon = Daemon(setup.config, tmp_path / "ferry.log").start()
    total = 400
    statuses: dict[int, int] = {}
    milestones = [threading.Event() for _ in range(3)]

    def poster() -> None:
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            for n in range(total):
                response = client.post("/hooks/demo", json={"n": n}, headers={"Idempotency-Key": f"k{n}"})
                statuses[n] = response.status_code
                if n in (100, 200, 300):
                    milestones[n // 100 - 1].set()

    try:
        thread = threading.Thread(target=poster)
        thread.start()
        for step, (key, extra) in enumerate([("b", NEW_SINK), ("c", NEW_SINK), ("d", "")]):
            assert milestones[step].wait(30)
            setup.rewrite(key=key, extra=extra)
            done = ctl(setup.config, "reload")
            assert done.returncode == 0, done.stderr
        thread.join(60)
        assert set(statuses.values()) == {202}
        assert len(statuses) == total
        out = wait_lines(setup, "out.jsonl", total, daemon)
        assert sorted(next(iter(event.values())) for event in out) == list(range(total))
    finally:
        daemon.stop()
