"""A sink answered 3xx: not followed, not retried, dead-lettered at once naming where it pointed.

Both HTTP clients (ferry's lean one and httpx), each redirect status, the real daemon. Following
would send the payload (and the sink's auth headers) to a URL nobody configured, and a 301/302/303
turns a POST into a GET in most clients; retrying cannot help until the operator changes the url.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import httpx

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ok, until, write_config

STATUSES = (301, 302, 303, 307, 308)

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.lean]
type = "http"
inputs = ["demo"]
url = "{url}/old"
retry = {{ max_attempts = 5, initial_backoff = "50ms", max_backoff = "100ms" }}

[sinks.viahttpx]
type = "http"
inputs = ["demo"]
url = "{url}/old"
client = "httpx"
retry = {{ max_attempts = 5, initial_backoff = "50ms", max_backoff = "100ms" }}
"""


def test_a_redirect_is_dead_lettered_at_once_with_its_location_and_never_followed(tmp_path: Path) -> None:
    receiver = FakeReceiver()

    def responder(request: Received) -> Reply:
        if request.path != "/old":
            return ok(request)  # where the redirect points: must never be reached
        status = STATUSES[request.json()["n"]]
        location = f"http://user:pa55word@127.0.0.1:{receiver.port}/new?token=s3cr3t"
        return status, {"Location": location}, b"moved"

    receiver.responder = responder
    receiver.start()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            ids = [client.post("/hooks/demo", json={"n": n}).json()["id"] for n in range(len(STATUSES))]

        def rows() -> list[tuple[str, str, int, int, int, str]]:
            db = f"file:{tmp_path / 'state/ferry.db'}?mode=ro"
            with contextlib.closing(sqlite3.connect(db, uri=True)) as conn:
                query = "SELECT id, stage, state, attempts, last_status, last_error FROM deliveries"
                return conn.execute(query).fetchall()

        found = until(rows, lambda found: len(found) == 10 and all(row[2] == 2 for row in found))
    finally:
        daemon.stop()
        receiver.stop()
    where = f"http://127.0.0.1:{receiver.port}/new?…"
    expected = {
        (
            f"{event_id}.{sink}",
            sink,
            2,
            1,
            status,
            f"HTTP {status} redirect to {where} (not followed: point the sink's url there)",
        )
        for event_id, status in zip(ids, STATUSES, strict=True)
        for sink in ("lean", "viahttpx")
    }
    assert set(found) == expected
    requests = receiver.snapshot()
    assert [request.path for request in requests] == ["/old"] * 10  # once each: not followed, not retried
    log = daemon.log_path.read_text(encoding="utf-8")
    assert "s3cr3t" not in log
    assert "pa55word" not in log
