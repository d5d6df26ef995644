"""A receiver's absurd `Retry-After` cannot park a delivery for ever (the real daemon, issue 13).

`Retry-After: 1000000000000` and an HTTP date in year 9999 are honoured up to an hour; a retry is
never scheduled after the delivery's `max_age`, so here (max_age 60 s) they end dead at once with
the reason, `dlq retry` brings them back, and `ferry ctl event` shows every stored timestamp.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

import httpx

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, ctl_json, ok, until, write_config

PIPELINE = """
[control]
socket = "{socket}"

[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "{url}/contacts"
retry = {{ max_attempts = 10, initial_backoff = "50ms", max_backoff = "1s", max_age = "60s" }}
"""

ABSURD = {0: "1000000000000", 1: "Fri, 31 Dec 9999 23:59:59 GMT"}


def states(tmp_path: Path) -> dict[str, tuple[int, int, str | None]]:
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'state/ferry.db'}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT id, state, attempts, last_error FROM deliveries WHERE stage = 'crm'")
        return {row[0]: row[1:] for row in rows}


def test_an_absurd_retry_after_ends_dead_with_the_reason_and_can_be_retried(
    tmp_path: Path, sock_dir: Path
) -> None:
    refusing = threading.Event()
    refusing.set()

    def responder(request: Received) -> Reply:
        if refusing.is_set():
            return 429, {"Retry-After": ABSURD[request.json()["n"]]}, b"slow down"
        return ok(request)

    receiver = FakeReceiver(responder).start()
    config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            ids = [client.post("/hooks/demo", json={"n": n}).json()["id"] for n in ABSURD]
        wanted = {f"{event_id}.crm" for event_id in ids}
        rows = until(lambda: states(tmp_path), lambda rows: {rows[i][0] for i in wanted if i in rows} == {2})
        assert {rows[i][:2] for i in wanted} == {(2, 1)}  # dead after one attempt, not parked
        reasons = sorted(str(rows[i][2]) for i in wanted)
        assert reasons[0] == "gave up: Retry-After 1e+12s ends after max_age 60s: HTTP 429: slow down"
        assert reasons[1].startswith("gave up: Retry-After 2.5")  # ~253,402,300,799 s minus now
        assert reasons[1].endswith("s ends after max_age 60s: HTTP 429: slow down")

        for event_id in ids:
            shown = ctl(config, "event", event_id)
            assert shown.returncode == 0, shown.stderr
            assert "dead" in shown.stdout

        refusing.clear()
        retried = ctl_json(config, "dlq", "retry", "--all")
        assert retried, retried
        until(lambda: states(tmp_path), lambda rows: {rows[i][0] for i in wanted} == {1})
    finally:
        daemon.stop()
        receiver.stop()


def test_a_row_parked_by_an_older_ferry_is_shown_and_unparked_at_start(
    tmp_path: Path, sock_dir: Path
) -> None:
    answers = {"status": 429}
    receiver = FakeReceiver(lambda request: (answers["status"], {"Retry-After": "40"}, b"later")).start()
    config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ferry.sock", url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            event_id = client.post("/hooks/demo", json={"n": 0}).json()["id"]
        delivery = f"{event_id}.crm"
        # Retry in 40 s: the sink leaves the row alone while the test rewrites it.
        until(lambda: states(tmp_path), lambda rows: rows.get(delivery, (0, 0))[1] >= 1)
        # What `Retry-After: 1e12` used to store: a retry in year 33,658.
        with contextlib.closing(sqlite3.connect(tmp_path / "state/ferry.db", timeout=10)) as conn:
            conn.execute("UPDATE deliveries SET next_attempt_at = 1e12 WHERE id = ?", (delivery,))
            conn.commit()
        shown = ctl(config, "event", event_id)
        assert shown.returncode == 0, shown.stderr
        assert "1000000000000.0 (out of range)" in shown.stdout
        daemon.stop()
        answers["status"] = 200
        daemon = Daemon(config, tmp_path / "ferry.log").start()  # the upgrade: due again at once
        until(lambda: states(tmp_path), lambda rows: rows[delivery][0] == 1)
    finally:
        daemon.stop()
        receiver.stop()
