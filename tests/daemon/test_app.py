"""The daemon in-process (`serve` in a nursery): one sink crashing must not stop ingest or other sinks."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import trio

from actors import http_sink
from daemon.app import Running, serve
from daemon.config import load
from daemon.errors import TooManyRestarts
from daemon.outbox import Due

CONFIG = """
[store]
path = "state/ferry.db"

[listener]
address = "127.0.0.1:0"

[supervisor]
max_restarts = {max_restarts}
window = "1m"
initial_backoff = "10ms"
max_backoff = "50ms"

[sources.demo]
type = "webhook"

[sinks.good]
type = "file"
inputs = ["demo"]
path = "good.jsonl"

[sinks.bad]
type = "http"
inputs = ["demo"]
url = "http://127.0.0.1:9/never"
"""


class ExplodingSender:
    """A sender with a bug: every send raises something that is not a delivery error."""

    def __init__(self, name: str, config: object) -> None:
        self.name = name

    async def send(self, batch: Sequence[Due]) -> int | None:
        raise RuntimeError("bug in sender")

    async def aclose(self) -> None:
        return None


@pytest.fixture
def exploding_http_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("daemon.registry.HttpSender", ExplodingSender)
    assert http_sink.HttpSender is not ExplodingSender  # only the registry's view is replaced


def write(tmp_path: Path, max_restarts: int) -> Path:
    path = tmp_path / "ferry.toml"
    path.write_text(CONFIG.format(max_restarts=max_restarts))
    return path


async def test_a_crashing_sink_is_restarted_while_ingest_and_other_sinks_go_on(
    tmp_path: Path, exploding_http_sink: None
) -> None:
    loaded = load(write(tmp_path, max_restarts=1000))
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: serve(loaded, handle_signals=False, task_status=task_status)
        )
        host, port = running.addresses[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            for n in range(30):
                response = await client.post("/hooks/demo", json={"n": n})
                assert response.status_code == 202
        good = tmp_path / "good.jsonl"
        with trio.fail_after(20):
            while not good.exists() or len(good.read_text().splitlines()) < 30:
                await trio.sleep(0.01)
            while running.supervisor.actors["sink.bad"].restarts < 3:
                await trio.sleep(0.01)
        state = running.supervisor.actors["sink.bad"]
        assert "RuntimeError: bug in sender" in (state.last_error or "")
        assert running.supervisor.actors["sink.good"].restarts == 0
        assert running.supervisor.actors["listener"].state == "running"
        running.stop.set()
    with sqlite3.connect(running.store.path) as conn:
        states = conn.execute(
            "SELECT state, count(*) FROM deliveries WHERE stage = 'bad' GROUP BY state"
        ).fetchall()
    assert states == [(0, 30)], (
        "the crashing sink's deliveries must stay pending, not be lost or dead-lettered"
    )


async def test_too_many_restarts_stops_the_daemon_with_a_named_error(
    tmp_path: Path, exploding_http_sink: None
) -> None:
    loaded = load(write(tmp_path, max_restarts=2))
    with pytest.RaisesGroup(TooManyRestarts, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                lambda task_status: serve(loaded, handle_signals=False, task_status=task_status)
            )
            host, port = running.addresses[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                assert (await client.post("/hooks/demo", json={"n": 1})).status_code == 202
            with trio.fail_after(20):
                await trio.sleep_forever()
