"""Poison events through the real daemon process: one event never stops a stage for good.

The events here are small at the door (the listener's own limits never see a deep body): the
deep JSON is made by the transform's jq, or the crash is injected into the daemon process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.store.outbox import Incoming, insert_events
from tests.fakes import HTTP, ROOT, Daemon, FakeReceiver, Received, Reply, ctl_json, until, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false
mask = ["email"]

[control]
socket = "{socket}"

[sources.in]
type = "webhook"
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["in"]
map = '{map}'

[sinks.out]
type = "http"
inputs = ["shape"]
url = "{url}/x"
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "100ms" }}
"""

# An event {"deep": N} becomes an output nested N arrays deep; any other passes unchanged.
DEEPEN = 'if .deep then (reduce range(.deep) as $i ({email: "a@b.c"}; [.])) else . end'


def echo(request: Received) -> Reply:
    # Echoes the body: the sink scrubs masked values out of the answer it stores and logs.
    return 200, {}, request.body


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver(echo).start()
    yield fake
    fake.stop()


def post(daemon: Daemon, body: Any) -> str:
    # A key per body, as a real sender keeps one per event: a post whose 202 was lost to a kill
    # after the commit is sent again, and must not store the event twice (every body here differs).
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    answer = HTTP.post(f"{daemon.url}/hooks/in", json=body, headers={"Idempotency-Key": key})
    assert answer.status_code in (200, 202), answer.text  # 200: a re-post after a lost 202
    return str(answer.json()["id"])


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s")


def delivered_ns(receiver: FakeReceiver) -> set[int]:
    with receiver.lock:
        return {json.loads(r.body)["n"] for r in receiver.requests if b'"n"' in r.body[:20]}


def test_a_deep_output_is_dead_lettered_and_the_pipeline_flows(
    tmp_path: Path, sock_dir: Path, receiver: FakeReceiver
) -> None:
    """The issue's critical case: the transform re-serialises ~1,000 nested levels.

    Old code: `RecursionError` crash-looped the transformer until `TooManyRestarts`.
    """
    config = write_config(
        tmp_path, PIPELINE.format(socket=sock_dir / "ctl.sock", map=DEEPEN, url=receiver.url)
    )
    daemon = Daemon(config, tmp_path / "log.jsonl").start()
    try:
        for depth in (400, 990, 5000):
            post(daemon, {"deep": depth})
        for n in range(20):
            post(daemon, {"n": n})
        wait_for(lambda: delivered_ns(receiver) == set(range(20)))
        dead = wait_for(
            lambda: (
                len(ctl_json(config, "dlq", "list")["items"]) >= 2
                and ctl_json(config, "dlq", "list")["items"]
            )
        )
        assert len(dead) == 2, dead  # 990 and 5000 deep; 400 deep is delivered, masked on its way
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
        reasons = [letter["last_error"] for letter in dead]
        assert all("RecursionError" in reason for reason in reasons), reasons
        assert all(letter["event_id"] for letter in dead)
        # Still flowing afterwards, and no actor restarted on the poison.
        post(daemon, {"n": 99})
        wait_for(lambda: 99 in delivered_ns(receiver))
        status = ctl_json(config, "status")
        assert sum(actor["restarts"] for actor in status["actors"]) == 0, status["actors"]
    finally:
        daemon.stop()


DIRECT = """
[telemetry]
traces = false
metrics = false
mask = ["email"]

[control]
socket = "{socket}"

[sources.in]
type = "webhook"
idempotency_header = "Idempotency-Key"

[sinks.out]
type = "http"
inputs = ["in"]
url = "{url}/x"
"""


def test_a_delivery_too_deep_to_mask_never_crash_loops_the_sink(
    tmp_path: Path, sock_dir: Path, receiver: FakeReceiver
) -> None:
    """A payload nested 2,000 levels, already in the store (whatever the listener lets in):
    the old recursive masking of the receiver's answer (`masking._collect`) raised
    `RecursionError` and the sink crash-looped until `TooManyRestarts`."""
    config = write_config(tmp_path, DIRECT.format(socket=sock_dir / "ctl.sock", url=receiver.url))
    Daemon(config, tmp_path / "log.jsonl").start().stop()  # creates the store
    deep = ('{"email":"a@b.c","d":[' * 1000 + "1" + "]}" * 1000).encode()
    conn = sqlite3.connect(tmp_path / "state" / "ferry.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        incoming = [Incoming("in", deep, None, ["out"])]
        incoming += [Incoming("in", json.dumps({"n": n}).encode(), None, ["out"]) for n in range(5)]
        insert_events(conn, incoming)
        conn.execute("COMMIT")
    finally:
        conn.close()
    daemon = Daemon(config, tmp_path / "log.jsonl").start()
    try:
        wait_for(lambda: set(range(5)) <= delivered_ns(receiver))

        def finished() -> bool:
            out = ctl_json(config, "status")["stages"]["out"]
            return bool(out["pending"] == 0 and out["delivered"] + out["dead"] == 6)

        wait_for(finished)
        with receiver.lock:
            deeps = [request for request in receiver.requests if request.body == deep]
        assert len(deeps) == 1  # delivered once; the echoed answer hidden, not a crash
        actors = ctl_json(config, "status")["actors"]
        assert all(actor["restarts"] == 0 for actor in actors), actors
    finally:
        daemon.stop()


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from actors.sink import http as http_sink
from actors.transform import program as transform

def kill(payloads):
    if any(b"KILLME" in payload for payload in payloads):
        os.kill(os.getpid(), signal.SIGKILL)  # a segfault or an OOM kill on this one event

_map = transform.TransformProgram.map
_send = http_sink.HttpSender.send

def map(self, payloads):
    if {stage!r} == "transform":
        kill(payloads)
    return _map(self, payloads)

async def send(self, batch):
    if {stage!r} == "sink":
        kill([due.payload for due in batch])
    return await _send(self, batch)

transform.TransformProgram.map = map
http_sink.HttpSender.send = send
"""


def restarted(config: Path, log: Path, env: dict[str, str], deaths: int) -> Daemon:
    """What systemd does after a death: start it again (it may be killed again before "ready")."""
    assert deaths <= 6, "the poison event was never quarantined"
    daemon = Daemon(config, log, env=env)
    try:
        daemon.start()
    except AssertionError:  # killed again before it logged "ready"
        assert daemon.proc is not None
        assert daemon.proc.returncode == -9
    return daemon


@pytest.mark.parametrize("stage", ["transform", "sink"])
def test_an_event_that_kills_the_process_is_quarantined_across_restarts(
    tmp_path: Path, sock_dir: Path, receiver: FakeReceiver, stage: str
) -> None:
    """An event whose transform (or delivery) kills the process (no Python code can catch that) is
    quarantined after `quarantine_after` deaths at the head of the stage; systemd's restarts (here:
    the test's) then deliver the rest. Old code: every restart died on the same event, for ever."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER.format(root=str(ROOT), stage=stage), encoding="utf-8")
    config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ctl.sock", map=".", url=receiver.url))
    env = {"PYTHONPATH": str(hook)}
    daemon = Daemon(config, tmp_path / "log.jsonl", env=env).start()
    unsent = [{"n": n, "text": "KILLME" if n == 3 else "ok"} for n in range(6)]
    deaths = 0
    deadline = time.monotonic() + 60
    while unsent or delivered_ns(receiver) != {0, 1, 2, 4, 5}:
        assert time.monotonic() < deadline, (deaths, delivered_ns(receiver))
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            deaths += 1
            daemon = restarted(config, tmp_path / "log.jsonl", env, deaths)
            continue
        # The poison goes in once the events before it are delivered: a delivery still in flight
        # when the poison kills the process is at the head of its own stage at every death too,
        # and is quarantined with it (a client posting faster than n=2 was delivered saw that).
        if unsent and (unsent[0]["text"] != "KILLME" or {0, 1, 2} <= delivered_ns(receiver)):
            try:
                post(daemon, unsent[0])
            except httpx.TransportError:
                continue  # it died meanwhile; the event was not acked
            unsent.pop(0)
            continue
        time.sleep(0.05)
    try:
        dead = wait_for(lambda: ctl_json(config, "dlq", "list")["items"])
        assert len(dead) == 1, dead
        (letter,) = dead
        assert letter["last_error"].startswith("poison: quarantined"), letter
        assert letter["id"].endswith(".shape" if stage == "transform" else ".shape.out")
        assert letter["attempts"] == 3
        shown = ctl_json(config, "dlq", "show", letter["id"])
        assert "KILLME" in json.dumps(shown)
        assert deaths >= 3
    finally:
        daemon.stop()


WAITER = """
import asyncio, os, signal, sys
sys.path.insert(0, {root!r})
import trio
from actors.sink import guard
from actors.transform import program as transform

_map = transform.TransformProgram.map

def map(self, payloads):
    if any(b"KILLME" in payload for payload in payloads):
        os.kill(os.getpid(), signal.SIGKILL)
    return _map(self, payloads)

async def admit(self):  # the sink is never let through: it sends nothing, in any incarnation
    await trio.sleep_forever()

transform.TransformProgram.map = map
guard.SinkGuard.admit_now = lambda self: None
guard.SinkGuard.admit = admit
"""


def test_a_delivery_its_sink_never_sent_is_not_quarantined_for_another_stages_poison(
    tmp_path: Path, sock_dir: Path, receiver: FakeReceiver
) -> None:
    """Event 0 waits at the head of the sink (never admitted, never sent) while event 1's
    transform kills the process at every start. Only event 1 is quarantined: old code counted each
    death against the sink's head too, and dead-lettered the innocent event 0 beside the poison."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WAITER.format(root=str(ROOT)), encoding="utf-8")
    config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ctl.sock", map=".", url=receiver.url))
    env = {"PYTHONPATH": str(hook)}
    daemon = Daemon(config, tmp_path / "log.jsonl", env=env).start()
    post(daemon, {"n": 0, "text": "ok"})
    until(lambda: ctl_json(config, "status")["stages"]["out"]["pending"], lambda pending: pending == 1)
    with contextlib.suppress(httpx.TransportError):  # it may die before answering: stored all the same
        post(daemon, {"n": 1, "text": "KILLME"})
    deaths = 0
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, deaths
        assert daemon.proc is not None
        if daemon.proc.poll() is None:
            try:
                listing = ctl_json(config, "dlq", "list")
            except AssertionError:
                time.sleep(0.05)  # killed again meanwhile
                continue
            if listing["total"] >= 1:
                break
            time.sleep(0.05)
            continue
        deaths += 1
        daemon = restarted(config, tmp_path / "log.jsonl", env, deaths)
    try:
        assert deaths >= 3
        until(lambda: ctl_json(config, "status")["stages"]["shape"]["dead"], lambda dead: dead == 1)
        listing = ctl_json(config, "dlq", "list")
        assert [letter["id"].count(".") for letter in listing["items"]] == [1], listing  # the transform's
        assert listing["items"][0]["last_error"].startswith("poison: quarantined")
        stages = ctl_json(config, "status")["stages"]
        assert stages["out"] == stages["out"] | {"pending": 1, "dead": 0}, "event 0 still waits, not dead"
    finally:
        daemon.stop()
