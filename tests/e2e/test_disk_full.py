"""A full disk under the real daemon: webhooks get 503, nothing breaks, ferry recovers by itself.

The state folder is a small tmpfs of its own (mounting needs root, as CI runs; elsewhere the
test is skipped), so the disk really fills: SQLite gets ENOSPC on the WAL, not a simulated error.
While it is full a sink keeps failing (its receiver is down), so retry outcomes must be written
too. The supervisor is told to give up at the first actor crash, so riding out the outage without
crashing is part of what is tested.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, free_port, write_config

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "http://127.0.0.1:{port}/contacts"
timeout = "1s"
retry = {{ max_attempts = 1000, initial_backoff = "50ms", max_backoff = "200ms" }}
"""


def mount(path: Path, size: str, *options: str) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/state` as a 1 MiB tmpfs."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0 or not mount(state, "1m"):
        pytest.skip("needs root (CAP_SYS_ADMIN) to mount a small tmpfs")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def grow(state: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(state)], check=True)


def test_a_full_disk_answers_503_corrupts_nothing_and_recovers_by_itself(
    tmp_path: Path, small_disk: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, PIPELINE.format(port=port))
    text = config.read_text(encoding="utf-8").replace("[supervisor]\n", "[supervisor]\nmax_restarts = 0\n")
    config.write_text(text, encoding="utf-8")
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    acked: list[str] = []
    refused: list[httpx.Response] = []
    receiver: FakeReceiver | None = None
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            pad = "x" * 4000
            for n in range(2000):  # far more than 1 MiB can hold
                response = client.post("/hooks/demo", json={"n": n, "pad": pad})
                if response.status_code == 202:
                    acked.append(response.json()["id"])
                else:
                    refused.append(response)
                    if len(refused) >= 30:
                        break
            assert len(refused) >= 30, "the disk never filled"
            assert acked, "nothing fit on the disk at all"
            for response in refused:
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert response.json() == {"error": "store unavailable, event not accepted; retry"}
            assert client.get("/readyz").status_code == 503

            # Full for a while: the sink keeps failing and must record that without crashing.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert client.post("/hooks/demo", json={"late": True, "pad": pad}).status_code == 503
                time.sleep(0.1)
            assert daemon.proc is not None
            assert daemon.proc.poll() is None, "the daemon gave up on a full disk"

            grow(small_disk, "64m")
            deadline = time.monotonic() + 15
            while True:
                response = client.post("/hooks/demo", json={"after": True})
                if response.status_code == 202:
                    acked.append(response.json()["id"])
                    break
                assert response.status_code == 503
                assert time.monotonic() < deadline, "ferry did not recover once space returned"
                time.sleep(0.05)
            while client.get("/readyz").status_code != 200:  # ready again after the store's hold
                assert time.monotonic() < deadline, "not ready again once space returned"
                time.sleep(0.05)

        receiver = FakeReceiver().start(port)
        wanted = {f"{event_id}.crm" for event_id in acked}
        receiver.wait_for(lambda seen: wanted <= {r.headers["idempotency-key"] for r in seen}, timeout=60)
    finally:
        daemon.stop()
        if receiver is not None:
            receiver.stop()
    crashes = [line for line in daemon.logs() if line.get("msg") == "actor crashed"]
    assert crashes == []
    with contextlib.closing(sqlite3.connect(small_disk / "ferry.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {row[0] for row in conn.execute("SELECT id FROM events")}
    assert stored == set(acked), "an event answered 503 was stored, or a 202 was lost"
    print(
        f"\ndisk full: {len(acked)} accepted, {len(refused)}+ refused with 503, all delivered, integrity ok"
    )
