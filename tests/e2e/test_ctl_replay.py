"""`ferry ctl replay` and `[store] archive` as real subprocesses against the real daemon process."""

from __future__ import annotations

import datetime
import json
import os
import pty
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import HTTP, ROOT, Daemon, FakeReceiver, ctl, ctl_json, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[sources.other]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
concurrency = 4

[sinks.raw]
type = "file"
inputs = ["demo"]
path = "raw.jsonl"

[sinks.elsewhere]
type = "file"
inputs = ["other"]
path = "elsewhere.jsonl"
"""


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver()
    fake.start()
    yield fake
    fake.stop()


Start = Callable[..., tuple[Path, Daemon]]


@pytest.fixture
def start(tmp_path: Path, sock_dir: Path, receiver: FakeReceiver) -> Iterator[Start]:
    daemons: list[Daemon] = []

    def run(retention: str = "1h", archive: str = "0s") -> tuple[Path, Daemon]:
        config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url))
        text = config.read_text().replace(
            'retention = "1h"', f'retention = "{retention}"\narchive = "{archive}"'
        )
        config.write_text(text)
        daemon = Daemon(config, tmp_path / "ferry.log").start()
        daemons.append(daemon)
        return config, daemon

    yield run
    for daemon in daemons:
        daemon.stop()


def post(daemon: Daemon, n: int, source: str = "demo") -> str:
    response = HTTP.post(f"{daemon.url}/hooks/{source}", json={"id": n})
    assert response.status_code == 202
    event_id: str = response.json()["id"]
    return event_id


def wait_stages(config: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> None:
    """Poll `ferry ctl status` until `predicate(stages)` holds (the daemon's own account)."""
    deadline = time.monotonic() + timeout
    while True:
        stages: dict[str, Any] = ctl_json(config, "status")["stages"]
        if predicate(stages):
            return
        assert time.monotonic() < deadline, f"status never satisfied the condition: {stages}"
        time.sleep(0.05)


def delivered(stages: dict[str, Any], **expected: int) -> bool:
    return all(
        stages[name]["delivered"] == count and stages[name]["pending"] == 0
        for name, count in expected.items()
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def keys(receiver: FakeReceiver) -> list[str]:
    return [r.headers["idempotency-key"] for r in receiver.snapshot()]


def rfc3339(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def test_replay_delivers_again_with_new_delivery_ids_to_every_sink_or_one(
    start: Start, receiver: FakeReceiver, tmp_path: Path
) -> None:
    config, daemon = start()
    ids = [post(daemon, n) for n in range(3)]
    post(daemon, 9, source="other")
    wait_stages(config, lambda s: delivered(s, crm=3, raw=3, elsewhere=1))

    replayed = ctl(config, "replay", "--source", "demo")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == "replay 1: 6 event(s), 6 new deliveries (crm 3, raw 3), ids ending .r1\n"
    wait_stages(config, lambda s: delivered(s, crm=6, raw=6, elsewhere=1))
    # the sink sends 4 at a time: order within a round is not fixed
    assert sorted(keys(receiver)[:3]) == sorted(f"{i}.shape.crm" for i in ids)
    assert sorted(keys(receiver)[3:]) == sorted(f"{i}.shape.crm.r1" for i in ids)
    assert sorted(r.body for r in receiver.snapshot()[3:]) == sorted(b'{"id":%d}' % n for n in range(3))
    raw = lines(tmp_path / "raw.jsonl")
    assert [line["id"] for line in raw] == [f"{i}.raw" for i in ids] + [f"{i}.raw.r1" for i in ids]
    assert [line["event"] for line in raw[3:]] == [{"id": n} for n in range(3)]
    assert len(lines(tmp_path / "elsewhere.jsonl")) == 1  # not downstream of demo

    only_crm = ctl_json(config, "replay", "--source", "demo", "--to", "crm")
    assert only_crm == {"replay": 2, "events": 3, "deliveries": 3, "by_sink": {"crm": 3}}
    wait_stages(config, lambda s: delivered(s, crm=9, raw=6))
    assert sorted(keys(receiver)[6:]) == sorted(f"{i}.shape.crm.r2" for i in ids)

    rows = ctl_json(config, "audit")["rows"]
    assert [(r["command"], r["outcome"]) for r in rows] == [
        ("replay", "ok: replay 1: 6 event(s), 6 new deliveries"),
        ("replay", "ok: replay 2: 3 event(s), 3 new deliveries"),
    ]
    assert json.loads(rows[1]["arguments"]) == {"source": "demo", "to": "crm"}


def test_replay_respects_since_and_until(start: Start, receiver: FakeReceiver, tmp_path: Path) -> None:
    config, daemon = start()
    first = post(daemon, 1)
    middle = time.time()  # the daemon stamps receipt with the same clock
    second = post(daemon, 2)
    wait_stages(config, lambda s: delivered(s, crm=2, raw=2))

    until = ctl_json(config, "replay", "--source", "demo", "--to", "raw", "--until", rfc3339(middle))
    assert (until["events"], until["by_sink"]) == (1, {"raw": 1})
    since = ctl_json(config, "replay", "--source", "demo", "--to", "raw", "--since", rfc3339(middle))
    assert (since["events"], since["by_sink"]) == (1, {"raw": 1})
    window = ctl_json(config, "replay", "--source", "demo", "--to", "raw", "--since", "1h")
    assert window["events"] == 2
    wait_stages(config, lambda s: delivered(s, raw=6, crm=2))
    replayed = [line["id"] for line in lines(tmp_path / "raw.jsonl")][2:]
    assert sorted(replayed) == sorted(
        [f"{first}.raw.r1", f"{second}.raw.r2", f"{first}.raw.r3", f"{second}.raw.r3"]
    )
    assert len(receiver.snapshot()) == 2  # --to raw: crm got nothing again

    empty = ctl(
        config,
        "replay",
        "--source",
        "demo",
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2000-01-02T00:00:00+00:00",
    )
    assert (empty.returncode, empty.stdout) == (0, "replay 4: no stored events of demo in that window\n")


def test_unknown_or_unrelated_names_and_bad_times_are_clear_errors(start: Start) -> None:
    config, _ = start()
    for args, message in [
        (["--source", "nope"], "error: no source named 'nope'\n"),
        (["--source", "demo", "--to", "nope"], "error: no sink named 'nope'\n"),
        (
            ["--source", "demo", "--to", "elsewhere"],
            "error: sink 'elsewhere' is not downstream of source 'demo'\n",
        ),
        (["--source", "demo", "--since", "1m", "--until", "1h"], "error: --since must be before --until\n"),
    ]:
        refused = ctl(config, "replay", *args)
        assert (refused.returncode, refused.stderr) == (1, message)
    for bad in ("yesterday", "2024-05-01T12:00:00"):
        usage = ctl(config, "replay", "--source", "demo", "--since", bad)
        assert usage.returncode == 2
        assert "--since" in usage.stderr
    outcomes = [r["outcome"] for r in ctl_json(config, "audit")["rows"]]
    assert outcomes == [
        "error: no source named 'nope'",
        "error: no sink named 'nope'",
        "error: sink 'elsewhere' is not downstream of source 'demo'",
        "error: --since must be before --until",
    ]


def pruned(stages: dict[str, Any]) -> bool:
    return all(
        stages[name][state] == 0 for name in ("crm", "raw") for state in ("pending", "delivered", "dead")
    )


@pytest.mark.parametrize("archive", ["1h", "0s"])
def test_archive_keeps_events_past_retention_for_replay(
    start: Start, receiver: FakeReceiver, tmp_path: Path, archive: str
) -> None:
    config, daemon = start(retention="200ms", archive=archive)
    ids = [post(daemon, n) for n in range(2)]
    receiver.wait_for(lambda seen: len(seen) == 2, timeout=20)
    # Delivered, then pruned after the retention; the pass that deletes an event's last
    # delivery would delete the event too (same transaction) if the archive did not keep it.
    wait_stages(config, pruned)
    with sqlite3.connect(tmp_path / "state" / "ferry.db") as db:
        (stored,) = db.execute("SELECT count(*) FROM events").fetchone()
    result = ctl_json(config, "replay", "--source", "demo")
    if archive == "0s":
        assert (stored, result["events"], result["deliveries"]) == (0, 0, 0)
        return
    assert stored == 4
    assert result["events"] == 4  # two received, two shaped
    receiver.wait_for(lambda seen: len(seen) == 4, timeout=20)
    assert sorted(keys(receiver)[2:]) == sorted(f"{i}.shape.crm.r1" for i in ids)


def test_replay_on_a_terminal_shows_a_progress_bar(start: Start) -> None:
    config, daemon = start()
    for n in range(3):
        post(daemon, n)
    wait_stages(config, lambda s: delivered(s, raw=3))
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), "replay", "--source", "demo"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        shown = os.read(controller, 65536).decode()
    finally:
        os.close(terminal)
        os.close(controller)
    assert "\rreplaying [##############################] 6/6 events" in shown
    assert "replay 1: 6 event(s), 6 new deliveries" in shown
