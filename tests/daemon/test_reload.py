"""Reload in-process (`serve` in a nursery): what changed is applied, the rest untouched, nothing lost."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.app import serve
from daemon.config.root import load, parse
from daemon.reload import frozen_changes, plan, reload
from daemon.running import Running
from tests.daemon.control.test_control import connect
from tests.fakes import FakeReceiver, Received, Reply

HEAD = """
[store]
path = "state/ferry.db"
durability = "normal"

[listener]
address = "127.0.0.1:0"

[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[supervisor]
shutdown_grace = "5s"
"""

DEMO = """
[sources.demo]
type = "webhook"

[sinks.raw]
type = "file"
inputs = ["demo"]
path = "raw.jsonl"
"""


class Daemon:
    """`serve` running in a test's nursery, with its config file and an HTTP client."""

    def __init__(self, tmp_path: Path, socket: Path) -> None:
        self.tmp_path = tmp_path
        self.socket = socket
        self.path = tmp_path / "ferry.toml"
        self.running: Running

    def write(self, body: str, head: str = HEAD) -> None:
        self.path.write_text(head.format(socket=self.socket) + body)

    async def start(self, nursery: trio.Nursery, body: str) -> Running:
        self.write(body)
        loaded = load(self.path)
        self.running = await nursery.start(
            lambda task_status: serve(loaded, handle_signals=False, task_status=task_status)
        )
        host, port = self.running.addresses[0]
        self.client = httpx.AsyncClient(base_url=f"http://{host}:{port}")
        return self.running

    async def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return await self.client.post(path, json=body, headers=headers)

    def lines(self, name: str) -> list[dict[str, Any]]:
        file = self.tmp_path / name
        if not file.exists():
            return []
        return [json.loads(line)["event"] for line in file.read_text().splitlines()]

    async def until_lines(self, name: str, count: int) -> list[dict[str, Any]]:
        """Wait until the file sink's output has `count` lines (polling the file, bounded)."""
        with trio.fail_after(20):
            while len(found := self.lines(name)) < count:
                await trio.sleep(0.01)
        return found


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ferry-reload-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def daemon(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Daemon]:
    ferry = Daemon(tmp_path, sock_dir / "ferry.sock")
    yield ferry
    if hasattr(ferry, "running"):
        await ferry.client.aclose()


# -- the plan (pure) ------------------------------------------------------------------------------

BASE = """
[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = "{id: .id}"

[sinks.crm]
type = "file"
inputs = ["shape"]
path = "/tmp/crm.jsonl"
"""


@pytest.mark.parametrize(
    ("extra", "replace", "added", "changed", "removed"),
    [
        ("", None, [], [], []),
        (
            '\n[sinks.audit]\ntype = "file"\ninputs = ["demo"]\npath = "/tmp/a.jsonl"\n',
            None,
            ["sinks.audit"],
            ["sources.demo"],  # its fan-out changed
            [],
        ),
        ("", ('map = "{id: .id}"', 'map = "{key: .id}"'), [], ["transforms.shape"], []),
        (
            '\n[sinks.more]\ntype = "file"\ninputs = ["shape"]\npath = "/tmp/m.jsonl"\n',
            None,
            ["sinks.more"],
            ["transforms.shape"],  # its sinks are fixed when it is built
            [],
        ),
        ("", ('path = "/tmp/crm.jsonl"', 'path = "/tmp/other.jsonl"'), [], ["sinks.crm"], []),
    ],
)
def test_plan_names_what_changed_including_rewired_producers(
    extra: str, replace: tuple[str, str] | None, added: list[str], changed: list[str], removed: list[str]
) -> None:
    old = parse(BASE)
    text = BASE + extra
    if replace is not None:
        text = text.replace(*replace)
    changes = plan(old, parse(text))
    assert (changes.paths("added"), changes.paths("changed"), changes.paths("removed")) == (
        added,
        changed,
        removed,
    )
    reverse = plan(parse(text), old)
    assert reverse.paths("removed") == added


def test_sections_that_cannot_change_live_are_named() -> None:
    old = parse(BASE)
    new = parse('[listener]\naddress = "127.0.0.1:9999"\n[supervisor]\nmax_restarts = 3\n' + BASE)
    assert frozen_changes(old, new) == [
        "[listener] changed: restart ferry to apply",
        "[supervisor] changed: restart ferry to apply",
    ]
    assert frozen_changes(old, parse(BASE)) == []


# -- applied to the running daemon ---------------------------------------------------------------


async def test_an_added_sink_gets_new_events_and_the_old_sink_is_untouched(daemon: Daemon) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, DEMO)
        raw = running.actors.sinks["raw"]
        raw_state = running.supervisor.actors["sink.raw"]
        began = raw_state.started_at
        for n in range(3):
            assert (await daemon.post("/hooks/demo", {"n": n})).status_code == 202
        await daemon.until_lines("raw.jsonl", 3)
        daemon.write(DEMO + '\n[sinks.new]\ntype = "file"\ninputs = ["demo"]\npath = "new.jsonl"\n')
        result = await reload(running)
        assert result.applied, result.errors
        assert (result.added, result.changed, result.removed) == (["sinks.new"], ["sources.demo"], [])
        assert result.not_started == []
        for n in range(3, 6):
            assert (await daemon.post("/hooks/demo", {"n": n})).status_code == 202
        assert [e["n"] for e in await daemon.until_lines("new.jsonl", 3)] == [3, 4, 5]
        assert [e["n"] for e in await daemon.until_lines("raw.jsonl", 6)] == list(range(6))
        assert running.actors.sinks["raw"] is raw
        assert running.supervisor.actors["sink.raw"] is raw_state
        assert (raw_state.restarts, raw_state.started_at, raw_state.state) == (0, began, "running")
        assert running.supervisor.actors["sink.new"].state == "running"
        running.stop.set()


async def test_a_removed_source_answers_404_and_the_others_keep_serving(daemon: Daemon) -> None:
    two = DEMO + '\n[sources.other]\ntype = "webhook"\n'
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, two)
        assert (await daemon.post("/hooks/other", {"n": 0})).status_code == 202
        daemon.write(DEMO)
        result = await reload(running)
        assert result.removed == ["sources.other"]
        gone = await daemon.post("/hooks/other", {"n": 1})
        assert (gone.status_code, gone.json()) == (404, {"error": "no webhook at /hooks/other"})
        assert (await daemon.post("/hooks/demo", {"n": 2})).status_code == 202
        assert [e["n"] for e in await daemon.until_lines("raw.jsonl", 1)] == [2]
        running.stop.set()


SHAPED = """
[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{{key}: .n}}'

[sinks.out]
type = "file"
inputs = ["shape"]
path = "out.jsonl"

[sinks.raw]
type = "file"
inputs = ["demo"]
path = "raw.jsonl"
"""


async def test_a_changed_map_applies_to_new_events(daemon: Daemon) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, SHAPED.format(key="old"))
        out_state = running.supervisor.actors["sink.out"]
        assert (await daemon.post("/hooks/demo", {"n": 1})).status_code == 202
        await daemon.until_lines("out.jsonl", 1)
        daemon.write(SHAPED.format(key="new"))
        result = await reload(running)
        assert (result.added, result.changed, result.removed) == ([], ["transforms.shape"], [])
        assert (await daemon.post("/hooks/demo", {"n": 2})).status_code == 202
        assert await daemon.until_lines("out.jsonl", 2) == [{"old": 1}, {"new": 2}]
        assert running.supervisor.actors["sink.out"] is out_state  # the sink it feeds did not restart
        assert running.supervisor.actors["transform.shape"].restarts == 0
        running.stop.set()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (DEMO + "\n[sinks.broken\n", "$: invalid TOML"),
        (
            DEMO.replace('type = "webhook"', 'type = "webhook"\ncolour = "red"'),
            "$.sources.demo.colour: unknown key",
        ),
        (
            DEMO + '\n[transforms.a]\ninputs = ["b"]\n\n[transforms.b]\ninputs = ["a"]\n',
            "cycle a -> b -> a",
        ),
    ],
    ids=["syntax", "unknown-key", "cycle"],
)
async def test_a_bad_file_changes_nothing_and_its_errors_are_answered(
    daemon: Daemon, body: str, expected: str
) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, DEMO)
        config, raw, actors = running.config, running.actors.sinks["raw"], dict(running.supervisor.actors)
        daemon.write(body)
        conn = await connect(running)
        answer = await conn.ask({"v": 1, "cmd": "reload"})
        assert answer["ok"] is False
        assert answer["error"].startswith("reload refused, nothing changed:\n  ")
        assert expected in answer["error"]
        assert running.config is config
        assert running.actors.sinks["raw"] is raw
        assert running.supervisor.actors == actors
        assert (await daemon.post("/hooks/demo", {"n": 1})).status_code == 202
        await daemon.until_lines("raw.jsonl", 1)
        audit = await conn.ask({"v": 1, "cmd": "audit"})
        (row,) = audit["result"]["rows"]
        assert row["command"] == "reload"
        assert row["outcome"].startswith("error: reload refused, nothing changed")
        running.stop.set()


async def test_a_listener_change_is_refused_whole(daemon: Daemon) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, DEMO)
        status = await (await connect(running)).ask({"v": 1, "cmd": "status"})
        daemon.write(
            DEMO + '\n[sinks.new]\ntype = "file"\ninputs = ["demo"]\npath = "new.jsonl"\n',
            head=HEAD.replace('address = "127.0.0.1:0"', 'address = "127.0.0.1:1"'),
        )
        result = await reload(running)
        assert not result.applied
        assert result.errors == ["[listener] changed: restart ferry to apply"]
        assert "new" not in running.actors
        assert "sink.new" not in running.supervisor.actors
        after = await (await connect(running)).ask({"v": 1, "cmd": "status"})
        assert after["result"]["config_sha256"] == status["result"]["config_sha256"]
        running.stop.set()


async def test_status_reports_the_new_config_hash_and_reload_is_audited(daemon: Daemon) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, DEMO)
        conn = await connect(running)
        before = (await conn.ask({"v": 1, "cmd": "status"}))["result"]["config_sha256"]
        daemon.write(DEMO + '\n[sinks.new]\ntype = "file"\ninputs = ["demo"]\npath = "new.jsonl"\n')
        answer = await conn.ask({"v": 1, "cmd": "reload"})
        assert answer["ok"] is True, answer
        status = (await conn.ask({"v": 1, "cmd": "status"}))["result"]
        assert status["config_sha256"] == answer["result"]["config_sha256"] != before
        assert "sink.new" in {a["name"] for a in status["actors"]}
        assert status["stages"]["new"]["kind"] == "sink"
        (row,) = (await conn.ask({"v": 1, "cmd": "audit"}))["result"]["rows"]
        assert (row["command"], row["outcome"]) == (
            "reload",
            "ok: reloaded: added sinks.new; changed sources.demo",
        )
        # Removing it again: its (here: none) pending rows stay; the stage is no longer a sink.
        daemon.write(DEMO)
        answer = await conn.ask({"v": 1, "cmd": "reload"})
        assert answer["result"]["removed"] == ["sinks.new"]
        status = (await conn.ask({"v": 1, "cmd": "status"}))["result"]
        assert "sink.new" not in {a["name"] for a in status["actors"]}
        running.stop.set()


class GatedReceiver(FakeReceiver):
    """Holds every request until `gate` opens; `arrived` is set when the first one is waiting."""

    def __init__(self) -> None:
        super().__init__(responder=self._respond)
        self.gate = threading.Event()
        self.arrived = threading.Event()

    def _respond(self, request: Received) -> Reply:
        self.arrived.set()
        self.gate.wait(30)
        return 200, {}, b"{}"


@pytest.fixture
def gated() -> Iterator[GatedReceiver]:
    receiver = GatedReceiver()
    receiver.start()
    yield receiver
    receiver.gate.set()
    receiver.stop()


async def test_an_unchanged_sinks_delivery_in_flight_is_not_interrupted(
    daemon: Daemon, gated: GatedReceiver
) -> None:
    body = DEMO + f'\n[sinks.crm]\ntype = "http"\ninputs = ["demo"]\nurl = "{gated.url}/c"\n'
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, body)
        crm, state = running.actors.sinks["crm"], running.supervisor.actors["sink.crm"]
        began = state.started_at
        assert (await daemon.post("/hooks/demo", {"n": 1})).status_code == 202
        await trio.to_thread.run_sync(gated.arrived.wait, 10)
        daemon.write(body + '\n[sinks.new]\ntype = "file"\ninputs = ["demo"]\npath = "new.jsonl"\n')
        result = await reload(running)  # returns while crm's request is still on the wire
        assert result.added == ["sinks.new"]
        assert not gated.gate.is_set()
        gated.gate.set()
        with trio.fail_after(10):
            while crm.delivered < 1:
                await trio.sleep(0.01)
        assert len(gated.snapshot()) == 1  # sent once, not cut off and sent again
        assert running.actors.sinks["crm"] is crm
        assert running.supervisor.actors["sink.crm"] is state
        assert (state.restarts, state.started_at, state.incarnation) == (0, began, crm)
        running.stop.set()


async def test_reload_under_load_loses_no_event(daemon: Daemon) -> None:
    extra = '\n[sinks.extra]\ntype = "file"\ninputs = ["shape"]\npath = "extra.jsonl"\n'
    variants = [
        SHAPED.format(key="b") + extra,  # a sink added, the transform feeding it rewired
        SHAPED.format(key="c") + extra,  # the map changed
        SHAPED.format(key="d"),  # the sink removed again, the transform rewired
    ]
    total, workers = 300, 6
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, SHAPED.format(key="a"))
        posted = 0
        milestones = {total * (i + 1) // (len(variants) + 1): trio.Event() for i in range(len(variants))}
        statuses: list[int] = []

        async def poster(worker: int) -> None:
            nonlocal posted
            for n in range(worker, total, workers):
                response = await daemon.post("/hooks/demo", {"n": n}, key=f"k-{n}")
                statuses.append(response.status_code)
                posted += 1
                if posted in milestones:
                    milestones[posted].set()

        results = []
        async with trio.open_nursery() as load:
            for worker in range(workers):
                load.start_soon(poster, worker)
            for (_, reached), variant in zip(sorted(milestones.items()), variants, strict=True):
                await reached.wait()
                daemon.write(variant)
                results.append(await reload(running))
        assert all(result.applied for result in results), [r.errors for r in results]
        assert statuses == [202] * total
        raw = await daemon.until_lines("raw.jsonl", total)
        assert sorted(e["n"] for e in raw) == list(range(total))
        out = await daemon.until_lines("out.jsonl", total)
        assert sorted(next(iter(e.values())) for e in out) == list(range(total))
        assert len(out) == total  # each event transformed exactly once, by the old map or the new
        assert {next(iter(e)) for e in out} <= {"a", "b", "c", "d"}
        assert running.supervisor.actors["sink.raw"].restarts == 0
        running.stop.set()
