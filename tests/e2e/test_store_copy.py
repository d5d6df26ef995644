"""Moving up: a SQLite daemon's outbox copied with `ferry store copy`, then served from PostgreSQL.

What was in flight on the one box goes on in the database: the retrying deliveries are delivered
by the daemon on PostgreSQL under the same `Idempotency-Key`, the dead letters are listed by
`ferry ctl dlq list`, and a webhook re-sent with the same idempotency key is still a duplicate.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx

from tests.daemon.store.test_copy import PIPELINE, ferry_store_copy, fill, kind_of
from tests.fakes import Daemon, Received, Reply, ctl_json, write_config
from tests.postgres import postgres_url

__all__ = ["postgres_url"]

ON_POSTGRES = """
[cluster]
node_id = "after-the-move"
"""


def test_what_was_in_flight_goes_on_from_postgresql(tmp_path: Path, postgres_url: str) -> None:
    (tmp_path / "one-box").mkdir()
    _, db, receiver = fill(tmp_path / "one-box")
    try:
        retried = {r.headers["idempotency-key"] for r in receiver.snapshot() if kind_of(r) == "later"}
        assert len(retried) == 3
        done = ferry_store_copy(str(db), "env:FERRY_TEST_DATABASE_URL", database_url=postgres_url)
        assert done.returncode == 0, done.stderr
        shutil.move(db, db.with_suffix(".moved"))  # the daemon below must not be reading SQLite

        accepted = 0

        def accept(_: Received) -> Reply:
            nonlocal accepted
            accepted += 1
            return 200, {}, b"{}"

        receiver.responder = accept
        seen_before = len(receiver.snapshot())
        folder = tmp_path / "cluster"
        folder.mkdir()
        config = write_config(folder, PIPELINE.format(url=receiver.url) + ON_POSTGRES)
        text = config.read_text().replace(
            '[store]\npath = "state/ferry.db"',
            '[store]\nbackend = "postgres"\nurl = "env:FERRY_DATABASE_URL"',
        )
        config.write_text(text)
        daemon = Daemon(config, folder / "daemon.log", env={"FERRY_DATABASE_URL": postgres_url})
        daemon.start()
        try:
            after = receiver.wait_for(
                lambda seen: {r.headers["idempotency-key"] for r in seen[seen_before:]} >= retried
            )
            again = {r.headers["idempotency-key"] for r in after[seen_before:]}
            assert again == retried  # the three retrying ones, same keys; nothing delivered twice
            with closing(sqlite3.connect(db.with_suffix(".moved"))) as lite:
                was_dead = {i for (i,) in lite.execute("SELECT id FROM deliveries WHERE state = 2")}
            listing = ctl_json(config, "dlq", "list")
            assert listing["total"] == 3
            assert {item["id"] for item in listing["items"]} == was_dead
            assert all(item["last_status"] == 400 for item in listing["items"])
            resent = httpx.post(
                f"{daemon.url}/hooks/hooks", json={"n": 0, "kind": "ok"}, headers={"Idempotency-Key": "k0"}
            )
            assert resent.status_code == 200, resent.text
            assert resent.json()["duplicate"] is True
        finally:
            daemon.stop()
    finally:
        receiver.stop()
    assert not os.path.exists(db)
