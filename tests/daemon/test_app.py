"""The daemon in-process (`serve` in a nursery): one sink crashing must not stop ingest or other sinks."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio.testing

from actors.sink import http as http_sink
from daemon.app import _maintain, _serving, serve
from daemon.config.root import Config, load, parse
from daemon.errors import TooManyRestarts
from daemon.reload import reload
from daemon.running import Running
from daemon.store.outbox import Due, Incoming, insert_events
from daemon.store.sqlite import Store
from daemon.telemetry import metrics

CONFIG = """
[store]
path = "state/ferry.db"

[listener]
address = "127.0.0.1:0"

[supervisor]
max_restarts = {max_restarts}
# These tests are about restarts; the quarantine of the head delivery (3 crashes) is tested in
# tests/e2e/test_poison.py.
quarantine_after = 1000
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

    def __init__(self, name: str, config: object, **_: object) -> None:
        self.name = name

    async def send(self, batch: Sequence[Due]) -> int | None:
        raise RuntimeError("bug in sender")

    async def aclose(self) -> None:
        return None


@pytest.fixture
def exploding_http_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("actors.sink.kind.HttpSender", ExplodingSender)
    unpatched: object = http_sink.HttpSender  # an object: mypy would call the identity check always true
    assert unpatched is not ExplodingSender  # only the sink kind's view is replaced


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
    assert isinstance(running.store, Store)  # the config's store is SQLite
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


DELIVERED_ROWS = "SELECT count(*) FROM deliveries WHERE state = 1"
PLAIN = """
[store]
path = "state/ferry.db"
retention = "{retention}"
audit_retention = "{audit_retention}"

[listener]
address = "127.0.0.1:0"

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


async def start_plain(
    nursery: trio.Nursery, tmp_path: Path, retention: str = "1h", audit_retention: str = "90d"
) -> Running:
    path = tmp_path / "ferry.toml"
    path.write_text(PLAIN.format(retention=retention, audit_retention=audit_retention))
    loaded = load(path)
    running: Running = await nursery.start(
        lambda task_status: serve(loaded, handle_signals=False, task_status=task_status)
    )
    return running


async def test_a_full_disk_answers_503_stores_nothing_and_recovers_by_itself(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_plain(nursery, tmp_path)
        assert isinstance(running.store, Store)  # PLAIN's store is SQLite: the test calls it directly
        host, port = running.addresses[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            assert (await client.post("/hooks/demo", json={"n": 0})).status_code == 202
            out = tmp_path / "out.jsonl"
            with trio.fail_after(10):  # delivered and recorded before the disk fills
                while await running.store.call(lambda conn: conn.execute(DELIVERED_ROWS).fetchone()[0]) < 1:
                    await trio.sleep(0.01)
            pages = await running.store.call(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
            # SQLite's page limit stands in for a full disk: every further write fails with SQLITE_FULL.
            await running.store.call(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
            refused = [
                await client.post("/hooks/demo", json={"n": n, "pad": "x" * 4000}) for n in range(1, 4)
            ]
            assert {r.status_code for r in refused} == {503}
            assert all("store" in r.json()["error"] for r in refused)
            assert refused[0].headers["retry-after"]
            assert (await client.get("/readyz")).status_code == 503
            await running.store.call(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
            assert (await client.post("/hooks/demo", json={"n": 4})).status_code == 202
            with trio.fail_after(5):  # ready again once no commit has failed for the store's hold
                while (await client.get("/readyz")).status_code != 200:
                    await trio.sleep(0.05)
        with trio.fail_after(10):
            while not out.exists() or len(out.read_text().splitlines()) < 2:
                await trio.sleep(0.01)
        running.stop.set()
    assert sorted(json.loads(line)["event"]["n"] for line in out.read_text().splitlines()) == [0, 4]


async def test_delivered_rows_are_pruned_after_retention(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_plain(nursery, tmp_path, retention="1s")
        assert isinstance(running.store, Store)  # PLAIN's store is SQLite: the test calls it directly
        host, port = running.addresses[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            for n in range(5):
                assert (await client.post("/hooks/demo", json={"n": n})).status_code == 202

        def rows(conn: sqlite3.Connection) -> tuple[int, int]:
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            deliveries = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]
            return events, deliveries

        with trio.fail_after(15):
            while (await running.store.call(rows))[1] < 5:
                await trio.sleep(0.01)
            while await running.store.call(rows) != (0, 0):
                await trio.sleep(0.05)
        running.stop.set()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


async def test_audit_rows_are_pruned_after_audit_retention(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_plain(nursery, tmp_path, retention="1s", audit_retention="1h")
        assert isinstance(running.store, Store)  # PLAIN's store is SQLite: the test calls it directly
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            for at, command in ((now - 7200, "old"), (now - 3700, "older than 1h"), (now, "young")):
                conn.execute(
                    "INSERT INTO audit(at, uid, pid, command, arguments, outcome) "
                    "VALUES (?, 0, 0, ?, '{}', 'ok')",
                    (at, command),
                )

        def commands(conn: sqlite3.Connection) -> list[str]:
            return [command for (command,) in conn.execute("SELECT command FROM audit ORDER BY rowid")]

        await running.store.call_until_committed(write)
        with trio.fail_after(15):  # the maintenance loop runs every retention / 4 here
            while await running.store.call(commands) != ["young"]:
                await trio.sleep(0.05)
        running.stop.set()


def test_ready_status_names_webhook_and_poll_sources(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    sources = """
[sources.a]
type = "webhook"

[sources.b]
type = "webhook"
"""
    poll = """
[sources.c]
type = "poll"
url = "http://127.0.0.1:9/items"
items = ".data"
key = ".id"
interval = "1m"
"""
    sink = """
[sinks.out]
type = "file"
inputs = [{inputs}]
path = "out.jsonl"
"""
    path.write_text(sources + poll + sink.format(inputs='"a", "b", "c"'))
    assert _serving(load(path).config) == "serving 2 webhook and 1 poll source(s)"
    path.write_text(poll + sink.format(inputs='"c"'))
    assert _serving(load(path).config) == "serving 1 poll source(s)"
    path.write_text(sources + sink.format(inputs='"a", "b"'))
    assert _serving(load(path).config) == "serving 2 webhook source(s)"


PRUNED = """
[store]
retention = "1s"

[sources.demo]
type = "webhook"

[sources.other]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo", "other"]
path = "out.jsonl"
"""
READ_BY_A_NEW_TRANSFORM = """
[transforms.late]
inputs = ["demo"]
map = "."
"""


class _Reloadable:
    """What `_maintain` reads of `Running`: the config, which a reload replaces."""

    def __init__(self, config: Config) -> None:
        self.config = config


async def test_pruning_reads_who_reads_what_after_its_sleep_so_a_reload_meanwhile_keeps_unread_events(
    store: Store, tmp_path: Path
) -> None:
    before = parse(PRUNED, base_dir=tmp_path)
    after = parse(PRUNED + READ_BY_A_NEW_TRANSFORM, base_dir=tmp_path)
    incoming = [Incoming("demo", b"{}", None, []), Incoming("other", b"{}", None, [])]
    await store.call(partial(insert_events, incoming=incoming))
    await store.call(lambda conn: conn.execute("UPDATE events SET received_at = received_at - 60"))

    def streams(conn: sqlite3.Connection) -> list[str]:
        return [stream for (stream,) in conn.execute("SELECT stream FROM events ORDER BY seq")]

    running = _Reloadable(before)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_maintain, store, cast(Running, running))
        await trio.testing.wait_all_tasks_blocked()  # the loop sleeps until its first prune
        running.config = after  # a reload adds a transform that has read nothing of `demo` yet
        with trio.fail_after(10):  # `other` has no reader in either config: its event goes
            while "other" in await store.call(streams):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert await store.call(streams) == ["demo"]


QUIET = (
    PLAIN.format(retention="1h", audit_retention="90d")
    + """
[telemetry]
metrics = false
"""
)
BACKLOG_RULE = """
[channels.ops]
type = "log"

[alerts.backlog]
expr = 'ferry.queue.depth{stage="out"} > 100'
notify = [{ channel = "ops" }]
"""


async def test_metrics_are_collected_only_while_alert_rules_read_them(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(QUIET)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: serve(load(path), handle_signals=False, task_status=task_status)
        )
        assert running.telemetry is not None
        assert running.telemetry.collect() is None
        assert not running.metrics.live  # instruments record nothing: nobody reads them
        assert metrics.current() is not running.metrics  # the daemon's own, not this task's
        path.write_text(QUIET + BACKLOG_RULE)
        assert (await reload(running)).applied
        assert running.metrics.live
        data = running.telemetry.collect()
        assert data is not None
        assert data.resource_metrics
        running.stop.set()
