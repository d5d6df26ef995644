"""`ferry ctl tap` / `ferry ctl top` and masking, as real subprocesses against the real daemon."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.e2e.test_ctl import wait_status
from tests.fakes import HTTP, ROOT, Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, write_config

EMAIL, SSN, CARD = "ann.secret@example.com", "123-45-6789", "4111111111111111"
TOKEN, TENANT = "Bearer SECRET-TOKEN-42", "TENANT-SECRET-7"
SECRETS = (EMAIL, SSN, CARD, TOKEN, TENANT)

PIPELINE = """
[telemetry]
traces = false
metrics = false
mask = ["email", "ssn", "$.card.number"]

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '.'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
concurrency = 4
headers = {{ authorization = "{token}", x-tenant = "{tenant}" }}
retry = {{ max_attempts = 2, initial_backoff = "10ms", max_backoff = "20ms" }}
"""


def person(n: int, pad: int = 0) -> dict[str, Any]:
    return {
        "id": n,
        "name": f"person {n}",
        "email": EMAIL,
        "profile": {"ssn": SSN},
        "card": {"number": CARD, "expiry": "12/30"},
        "pad": "x" * pad,
    }


class Echoing(FakeReceiver):
    """Refuses events whose id is in `rejected` with a body quoting the payload and the auth header."""

    def __init__(self) -> None:
        super().__init__(responder=self._respond)
        self.rejected: set[int] = set()

    def _respond(self, request: Received) -> Reply:
        body = request.json()
        if body["id"] in self.rejected:
            echo = (
                f"{body['email']} / {body['card']['number']} refused for {request.headers['authorization']}"
            )
            return 422, {}, json.dumps({"error": echo}).encode()
        return 200, {}, b"{}"


@pytest.fixture
def receiver() -> Iterator[Echoing]:
    fake = Echoing()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path, receiver: Echoing) -> Path:
    body = PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url, token=TOKEN, tenant=TENANT)
    return write_config(tmp_path, body)


@pytest.fixture
def daemon(config: Path, tmp_path: Path) -> Iterator[Daemon]:
    process = Daemon(config, tmp_path / "ferry.log").start()
    yield process
    process.stop()


def post(daemon: Daemon, n: int, pad: int = 0) -> None:
    answer = HTTP.post(f"{daemon.url}/hooks/demo", json=person(n, pad))
    assert answer.status_code == 202, answer.text


def start_tap(config: Path, *args: str, stderr: IO[bytes] | int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """`ferry ctl tap ARGS` as a subprocess; `wait_subscribed` waits for the daemon's confirmation."""
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), "tap", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
    )


def wait_subscribed(tap: subprocess.Popen[bytes]) -> None:
    assert tap.stderr is not None
    first = tap.stderr.readline().decode()
    assert first.startswith("ferry ctl tap: tapping "), first


def test_tap_streams_masked_events_of_a_source_and_stops_at_the_limit(config: Path, daemon: Daemon) -> None:
    tap = start_tap(config, "demo", "--limit", "3")
    wait_subscribed(tap)
    for n in range(5):
        post(daemon, n)
    out, err = tap.communicate(timeout=30)
    assert tap.returncode == 0, err
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["payload"]["id"] for e in events] == [0, 1, 2]
    first = events[0]
    assert (first["component"], first["kind"]) == ("demo", "source")
    assert re.fullmatch(r"[0-9a-f]{27}", first["event_id"])
    assert first["payload"] == {
        "id": 0,
        "name": "person 0",
        "email": "***",
        "profile": {"ssn": "***"},
        "card": {"number": "***", "expiry": "12/30"},
        "pad": "",
    }
    assert "3 event(s), 0 dropped" in err.decode()
    assert not any(secret.encode() in out + err for secret in SECRETS)


def test_tap_on_a_transform_and_a_sink_shows_outputs_and_outcomes(
    config: Path, daemon: Daemon, receiver: Echoing
) -> None:
    receiver.rejected = {1}
    shape = start_tap(config, "shape", "--limit", "2")
    crm = start_tap(config, "crm", "--limit", "2")
    wait_subscribed(shape)
    wait_subscribed(crm)
    post(daemon, 0)
    post(daemon, 1)
    shaped, _ = shape.communicate(timeout=30)
    delivered, _ = crm.communicate(timeout=30)
    assert shape.returncode == crm.returncode == 0
    outputs = [json.loads(line) for line in shaped.decode().splitlines()]
    assert [o["kind"] for o in outputs] == ["transform", "transform"]
    assert outputs[0]["event_id"] == outputs[0]["parent"] + ".shape"
    assert outputs[0]["payload"]["email"] == "***"
    attempts = {a["payload"]["id"]: a for a in map(json.loads, delivered.decode().splitlines())}
    assert attempts[0]["outcome"] == "delivered"
    assert attempts[0]["status"] == 200
    assert attempts[0]["delivery_id"] == f"{attempts[0]['event_id']}.crm"
    assert attempts[1]["outcome"] in ("retry", "dead")
    assert attempts[1]["status"] == 422
    assert attempts[1]["error"] == 'HTTP 422: {"error": "*** / *** refused for ***"}'
    assert not any(secret.encode() in shaped + delivered for secret in SECRETS)


def test_a_slow_tap_client_loses_events_not_the_pipeline(
    config: Path, daemon: Daemon, receiver: Echoing, tmp_path: Path
) -> None:
    total = 400
    with (tmp_path / "tap.err").open("w+b") as errors:
        # stdout is a pipe nobody reads yet: the client blocks, then the daemon's socket buffer fills
        tap = start_tap(config, "crm", "--buffer", "8", stderr=errors)
        deadline = time.monotonic() + 20
        while b"tapping crm" not in (tmp_path / "tap.err").read_bytes():
            assert time.monotonic() < deadline
            assert tap.poll() is None
            time.sleep(0.02)
        # One client for the 400: setting up an httpx client (its TLS context) costs ~45 ms of CPU,
        # which was most of this test's 13 s and more under load.
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(total):
                answer = client.post("/hooks/demo", json=person(n, pad=4096))
                assert answer.status_code == 202, answer.text
        # Every event is delivered while the tap client reads nothing.
        seen = receiver.wait_for(lambda requests: len(requests) >= total, timeout=60)
        assert sorted(r.json()["id"] for r in seen) == list(range(total))
        assert tap.poll() is None

        lines: list[bytes] = []
        stdout = tap.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
        reader.start()

        def dropped() -> int:
            counts = re.findall(rb"(\d+) event\(s\) dropped so far", (tmp_path / "tap.err").read_bytes())
            return int(counts[-1]) if counts else 0

        deadline = time.monotonic() + 30
        while len(lines) + dropped() < total:  # the client catches up and learns what it lost
            assert time.monotonic() < deadline, (len(lines), dropped())
            time.sleep(0.05)
        tap.send_signal(signal.SIGINT)
        assert tap.wait(15) == 0
        reader.join(10)
        summary = (tmp_path / "tap.err").read_bytes().decode()
    assert dropped() > 0, summary
    assert len(lines) + dropped() == total
    assert f"{len(lines)} event(s), {dropped()} dropped" in summary
    assert all(json.loads(line)["outcome"] == "delivered" for line in lines)


def test_top_once_shows_every_component(config: Path, daemon: Daemon) -> None:
    post(daemon, 1)
    wait_status(config, lambda s: s["stages"]["crm"]["delivered"] == 1)
    frame = ctl(config, "top", "--once")
    assert frame.returncode == 0, frame.stderr
    text = frame.stdout
    for name in ("demo", "shape", "crm", "sink.crm", "transform.shape", "ingest", "listener"):
        assert re.search(rf"^{re.escape(name)}\s", text, re.MULTILINE), (name, text)
    assert re.search(r"^demo\s+source\s+1\s", text, re.MULTILINE), text
    assert re.search(r"^crm\s+sink\s+0\s+1\s+0\s", text, re.MULTILINE), text
    assert "restarts 0" in text
    assert "\x1b" not in text  # --once prints a plain frame


def test_masked_fields_and_secrets_never_reach_logs_dlq_or_audit(
    config: Path, daemon: Daemon, receiver: Echoing, tmp_path: Path
) -> None:
    receiver.rejected = {7}
    post(daemon, 7)
    post(daemon, 8)
    wait_status(config, lambda s: s["stages"]["crm"]["dead"] == 1 and s["stages"]["crm"]["delivered"] == 1)
    # The receiver got the real values: masking is for what ferry shows, not what it delivers.
    refused = [r for r in receiver.snapshot() if r.json()["id"] == 7]
    assert refused[0].json()["email"] == EMAIL
    assert refused[0].headers["authorization"] == TOKEN

    (dead,) = ctl_json(config, "dlq", "list")["items"]
    shown = ctl_json(config, "dlq", "show", dead["id"])["delivery"]
    assert shown["payload"]["email"] == "***"
    assert shown["payload"]["card"] == {"number": "***", "expiry": "12/30"}
    assert shown["payload"]["profile"] == {"ssn": "***"}
    assert "*** / *** refused for ***" in shown["last_error"]
    retried = ctl(config, "dlq", "retry", dead["id"])
    assert retried.returncode == 0, retried.stderr
    outputs = [
        ctl(config, "dlq", "show", dead["id"]),
        ctl(config, "dlq", "list"),
        ctl(config, "--json", "dlq", "list"),
        ctl(config, "audit"),
        ctl(config, "--json", "audit"),
        ctl(config, "status"),
        ctl(config, "stats"),
        ctl(config, "top", "--once"),
    ]
    daemon.stop()
    logs = (tmp_path / "ferry.log").read_text()
    assert "delivery dead-lettered" in logs or "delivery will be retried" in logs
    for secret in SECRETS:
        assert secret not in logs, secret
        for done in outputs:
            assert secret not in done.stdout + done.stderr, (secret, done.args)
