"""The real daemon on PostgreSQL (`[store] backend = "postgres"`): webhooks acked after the PG commit,
delivered to a real receiver, nothing lost through `kill -9` and restarts, 503 while the database is
unreachable (a TCP relay the test cuts: the machine's server keeps running for everyone else)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from daemon.store.postgres.connect import open_database
from daemon.store.postgres.schema import VERSION
from tests.fakes import ROOT, Daemon, FakeReceiver, free_port, write_config
from tests.postgres import TcpProxy, pg_proxy, postgres_url

__all__ = ["pg_proxy", "postgres_url"]

PIPELINE = """
[store]
backend = "postgres"
url = "env:FERRY_DATABASE_URL"

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{id: .id, name: .name}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "RECEIVER/contacts"
concurrency = 8
timeout = "5s"
retry = { max_attempts = 50, initial_backoff = "100ms", max_backoff = "1s" }
"""


def config_for(tmp_path: Path, receiver: FakeReceiver, port: int) -> Path:
    path = write_config(tmp_path, "", port=port)
    # write_config's [store] is SQLite's: this pipeline brings its own.
    text = path.read_text().replace('[store]\npath = "state/ferry.db"\nretention = "1h"\n', "")
    path.write_text(text + PIPELINE.replace("RECEIVER", receiver.url))
    return path


@pytest.mark.timeout(300)  # three daemon starts on a loaded machine
async def test_postgres_daemon_acks_after_commit_survives_kill_9_and_answers_503_while_the_database_is_away(
    tmp_path: Path, postgres_url: str, pg_proxy: TcpProxy
) -> None:
    receiver = FakeReceiver().start()
    port = free_port()
    config = config_for(tmp_path, receiver, port)
    env = {"FERRY_DATABASE_URL": pg_proxy.url(postgres_url)}
    daemon = Daemon(config, tmp_path / "ferry.log", env=env).start()
    # Each kill lands with the 20 posters' requests in flight and deliveries under way, whatever
    # the total: 150 events between kills (several seconds of posting through the relay) put it
    # in the middle of the burst as surely as 300 did, at half the test's 35 s.
    total, kills = 450, 2
    acked: dict[int, str] = {}
    todo = list(reversed(range(total)))

    async def poster(client: httpx.AsyncClient) -> None:
        while todo:
            n = todo.pop()
            while True:
                try:
                    response = await client.post(
                        "/hooks/demo", json={"id": n, "name": f"n{n}"}, headers={"Idempotency-Key": f"e{n}"}
                    )
                except httpx.TransportError:
                    await trio.sleep(0.01)  # the daemon is down: a real sender retries
                    continue
                assert response.status_code in (202, 200), response.text
                acked[n] = response.json()["id"]
                break

    async def killer() -> None:
        nonlocal daemon
        for round_ in range(kills):
            while len(acked) < (round_ + 1) * total // (kills + 1):
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(daemon.kill9)
            daemon = await trio.to_thread.run_sync(Daemon(config, tmp_path / "ferry.log", env=env).start)

    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(killer)
            for _ in range(20):
                nursery.start_soon(poster, client)
        assert len(acked) == total
        # Every acked event is in PostgreSQL (202 came after its commit) and reaches the receiver.
        with psycopg.connect(postgres_url) as conn:
            stored = conn.execute("SELECT count(*) FROM events WHERE stream = 'demo'").fetchone()
        assert stored == (total,)
        requests = await trio.to_thread.run_sync(
            lambda: receiver.wait_for(lambda seen: {r.json()["id"] for r in seen} >= set(acked), timeout=120)
        )
        keys: dict[int, set[str]] = defaultdict(set)
        for request in requests:
            keys[request.json()["id"]].add(request.headers["idempotency-key"])
        assert all(len(k) == 1 for k in keys.values()), "copies of one delivery carried different keys"

        # The database goes away: webhooks are refused with 503 + Retry-After, nothing acked.
        pg_proxy.cut()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            refused = await client.post("/hooks/demo", json={"id": -1, "name": "x"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503
            pg_proxy.restore()
            with trio.fail_after(60):
                while True:
                    response = await client.post("/hooks/demo", json={"id": total, "name": "back"})
                    if response.status_code == 202:
                        break
                    assert response.status_code == 503, response.text
                    await trio.sleep(0.1)
        await trio.to_thread.run_sync(
            lambda: receiver.wait_for(lambda seen: any(r.json()["id"] == total for r in seen), timeout=60)
        )
        assert not any(r.json()["id"] == -1 for r in receiver.requests)
        assert sum(1 for line in daemon.logs() if line.get("msg") == "ready") == kills + 1
    finally:
        daemon.stop()
        receiver.stop()


def test_a_node_meeting_a_newer_schema_refuses_to_start_with_exit_2(
    tmp_path: Path, postgres_url: str
) -> None:
    receiver = FakeReceiver().start()
    try:
        config = config_for(tmp_path, receiver, free_port())
        open_database(postgres_url, node="other", cipher=None).close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("INSERT INTO ferry_schema VALUES (%s, 0)", (VERSION + 1,))
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "run", "-c", str(config)],
            cwd=ROOT,
            env={**os.environ, "FERRY_DATABASE_URL": postgres_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        receiver.stop()
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"schema version {VERSION + 1} is newer than this ferry ({VERSION})" in done.stderr
    assert "SchemaMismatch" in done.stderr
