"""Encryption at rest with the real daemon: the file shows no payload, a restart without the key
(or with a wrong one) is refused before anything is written, a restart with the key delivers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.fakes import ROOT, Daemon, FakeReceiver, Received, Reply, write_config

MARK = "top-secret-payload-marker"
KEY, OTHER = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()

PIPELINE = """
[telemetry]
metrics = false
{encryption}
[sources.in]
type = "webhook"

[transforms.shape]
inputs = ["in"]
map = '{{n: .n, note: .note, shaped: true}}'

[sinks.out]
type = "http"
inputs = ["shape"]
url = "{url}/x"
retry = {{ max_attempts = 100, initial_backoff = "50ms", max_backoff = "100ms" }}
"""
ENCRYPTED = '[store.encryption]\nkey = "credential:ferry-store-key"\n'


def _files(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((tmp_path / "state").glob("ferry.db*")))


def _refused(config: Path, credentials: Path) -> str:
    """Run the daemon expecting it to refuse to start; its log output."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "-c", str(config)],
        cwd=ROOT,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr


def test_encrypted_store_hides_payloads_refuses_wrong_keys_and_delivers_with_the_right_one(
    tmp_path: Path,
) -> None:
    down = True

    def answer(_: Received) -> Reply:
        return (503, {}, b"") if down else (200, {}, b"{}")

    receiver = FakeReceiver(answer).start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "ferry-store-key").write_text(KEY + "\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    config = write_config(tmp_path, PIPELINE.format(encryption=ENCRYPTED, url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log", env=env).start()
    try:
        for n in range(20):
            response = httpx.post(f"{daemon.url}/hooks/in", json={"n": n, "note": MARK}, timeout=10)
            assert response.status_code == 202
        deadline = time.monotonic() + 20
        while len({json.loads(r.body)["n"] for r in receiver.snapshot()}) < 20:  # tried, all failing
            assert time.monotonic() < deadline
            time.sleep(0.02)
        daemon.stop()
        stored = _files(tmp_path)
        assert MARK.encode() not in stored
        assert b"!fe1." in stored

        # Without the key, or with another, the daemon refuses to start and changes nothing.
        digest = hashlib.sha256(stored).hexdigest()
        plain = write_config(tmp_path, PIPELINE.format(encryption="", url=receiver.url))
        assert "which is not configured; set [store] encryption" in _refused(plain, credentials)
        (credentials / "ferry-store-key").write_text(OTHER)
        wrong = write_config(tmp_path, PIPELINE.format(encryption=ENCRYPTED, url=receiver.url))
        assert "wrong key" in _refused(wrong, credentials)
        assert hashlib.sha256(_files(tmp_path)).hexdigest() == digest

        # With the key back, every stored event is delivered as it was received.
        (credentials / "ferry-store-key").write_text(KEY)
        down = False
        daemon = Daemon(wrong, tmp_path / "ferry.log", env=env).start()
        deadline = time.monotonic() + 20
        while True:
            ok = [json.loads(r.body) for r in receiver.snapshot()]
            if {item["n"] for item in ok[-20:]} == set(range(20)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        bodies = {item["n"]: item for item in ok}
        assert set(bodies) == set(range(20))
        assert all(item == {"n": n, "note": MARK, "shaped": True} for n, item in bodies.items())
    finally:
        daemon.stop()
        receiver.stop()
