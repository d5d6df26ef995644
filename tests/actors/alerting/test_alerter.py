"""The alerter on trio's MockClock: real metric instruments, a real store, real HTTP endpoints.

Time only moves when a test jumps the clock; an evaluation's HTTP and SQLite work is real I/O,
waited for by counting evaluations (with a real-time deadline).
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from actors.alerting.alerter import Alerter
from actors.alerting.expr import flatten
from daemon.config.root import Config, parse
from daemon.store.sqlite import Store
from daemon.telemetry.metrics import Metrics
from tests.fakes import FakeReceiver, Received, Reply

INTERVAL = 15

RULES = """
[alerting]
interval = "15s"

[channels.ops]
type = "webhook"
url = "{ops}/alerts"
headers = {{ authorization = "env:FERRY_TEST_ALERT_TOKEN" }}

[channels.chat]
type = "slack"
url = "env:FERRY_TEST_SLACK_URL"

[alerts.crm_backlog]
expr = 'ferry.queue.depth{{stage="crm"}} > 1000'
for = "1m"
severity = "critical"
description = "the CRM is not keeping up"
notify = [{{ channel = "ops" }}, {{ channel = "chat", after = "5m" }}]
"""


class Rig:
    """An alerter wired to live instruments, the store, and a clock the test moves."""

    def __init__(self, config: Config, store: Store, clock: trio.testing.MockClock) -> None:
        self.reader = InMemoryMetricReader()
        self.metrics = Metrics(MeterProvider(metric_readers=[self.reader]).get_meter("test"))
        self.clock = clock
        self.alerter = Alerter(
            config, store, lambda: flatten(self.reader.get_metrics_data()), clock=trio.current_time
        )

    async def evaluated(self, count: int) -> None:
        """Wait (real time, bounded) until the alerter has evaluated `count` times."""
        deadline = time.monotonic() + 10
        while self.alerter.evaluations < count:
            assert time.monotonic() < deadline, f"only {self.alerter.evaluations} evaluations"
            await trio.testing.wait_all_tasks_blocked()

    async def tick(self) -> None:
        """Move the clock one interval and wait for the evaluation it causes."""
        done = self.alerter.evaluations
        self.clock.jump(INTERVAL)
        await self.evaluated(done + 1)


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeReceiver, FakeReceiver]]:
    ops, chat = FakeReceiver().start(), FakeReceiver().start()
    monkeypatch.setenv("FERRY_TEST_ALERT_TOKEN", "Bearer s3cret")
    monkeypatch.setenv("FERRY_TEST_SLACK_URL", f"{chat.url}/services/T0/B0/XYZ")
    yield ops, chat
    ops.stop()
    chat.stop()


@pytest.fixture
async def running(
    endpoints: tuple[FakeReceiver, FakeReceiver], store: Store, mock_clock: trio.testing.MockClock
) -> AsyncIterator[Rig]:
    rig = Rig(parse(RULES.format(ops=endpoints[0].url)), store, mock_clock)
    rig.metrics.queue_depths["crm"] = 5000
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.alerter.run)
        await rig.evaluated(1)
        yield rig
        nursery.cancel_scope.cancel()


def bodies(receiver: FakeReceiver) -> list[Any]:
    return [request.json() for request in receiver.snapshot()]


async def test_fires_after_for_escalates_once_per_step_and_resolves(
    running: Rig, endpoints: tuple[FakeReceiver, FakeReceiver], mock_clock: trio.testing.MockClock
) -> None:
    ops, chat = endpoints
    assert running.alerter.states["crm_backlog"].state == "pending"
    for _ in range(3):
        await running.tick()
    assert bodies(ops) == []  # 45 s: still pending
    await running.tick()  # 60 s: fires
    fired = bodies(ops)
    assert len(fired) == 1
    assert fired[0] | {"since": 0, "at": 0, "host": ""} == {
        "alert": "crm_backlog",
        "status": "firing",
        "severity": "critical",
        "summary": 'crm_backlog: ferry.queue.depth{stage="crm"} = 5000 (> 1000 for 1m)',
        "description": "the CRM is not keeping up",
        "expr": 'ferry.queue.depth{stage="crm"} > 1000',
        "value": 5000.0,
        "threshold": 1000.0,
        "since": 0,
        "at": 0,
        "step": 0,
        "channel": "ops",
        "service": "ferry",
        "host": "",
    }
    assert ops.snapshot()[0].headers["authorization"] == "Bearer s3cret"
    for _ in range(19):  # 4 min 45 s more of firing: nothing new anywhere
        await running.tick()
    assert (len(bodies(ops)), len(bodies(chat))) == (1, 0)
    await running.tick()  # firing for 5 minutes: escalates to chat
    assert [r.path for r in chat.snapshot()] == ["/services/T0/B0/XYZ"]
    assert "*[FIRING]* crm_backlog (critical)" in bodies(chat)[0]["text"]
    running.metrics.queue_depths["crm"] = 10
    await running.tick()
    assert [b["status"] for b in bodies(ops)] == ["firing", "resolved"]
    assert "resolved after 5m" in bodies(chat)[-1]["text"]
    for _ in range(4):
        await running.tick()
    assert (len(bodies(ops)), len(bodies(chat))) == (2, 2)
    shown = running.alerter.views()[0]
    assert (shown.state, shown.fired, shown.last_error) == ("ok", 1, None)


async def test_a_failing_channel_gets_one_try_per_evaluation_until_it_takes_it(
    endpoints: tuple[FakeReceiver, FakeReceiver], store: Store, mock_clock: trio.testing.MockClock
) -> None:
    answers = iter([503, 503, 500])

    def flaky(request: Received) -> Reply:
        return (next(answers, 200), {}, b"")

    ops = FakeReceiver(responder=flaky).start()
    try:
        rig = Rig(parse(RULES.format(ops=ops.url).replace('for = "1m"', 'for = "0s"')), store, mock_clock)
        rig.metrics.queue_depths["crm"] = 5000
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.alerter.run)
            await rig.evaluated(1)
            assert len(ops.snapshot()) == 1
            assert rig.alerter.states["crm_backlog"].last_error == "ops: HTTP 503"
            for expected in (2, 3, 4, 4, 4):
                await rig.tick()
                assert len(ops.snapshot()) == expected
            assert rig.alerter.states["crm_backlog"].last_error is None
            nursery.cancel_scope.cancel()
    finally:
        ops.stop()


async def test_a_restarted_alerter_resumes_from_the_store_without_notifying_again(
    endpoints: tuple[FakeReceiver, FakeReceiver], store: Store, mock_clock: trio.testing.MockClock
) -> None:
    ops, chat = endpoints
    config = parse(RULES.format(ops=ops.url).replace('for = "1m"', 'for = "0s"'))
    first = Rig(config, store, mock_clock)
    first.metrics.queue_depths["crm"] = 5000
    async with trio.open_nursery() as nursery:
        await nursery.start(first.alerter.run)
        await first.evaluated(1)
        await first.tick()
        nursery.cancel_scope.cancel()
    assert len(bodies(ops)) == 1
    second = Rig(config, store, mock_clock)  # fresh instruments: counters restart, gauges re-reported
    second.metrics.queue_depths["crm"] = 5000
    async with trio.open_nursery() as nursery:
        await nursery.start(second.alerter.run)
        await second.evaluated(1)
        assert second.alerter.states["crm_backlog"].state == "firing"
        assert second.alerter.states["crm_backlog"].since == 0
        for _ in range(18):  # up to 4 min 45 s after the first firing
            await second.tick()
        assert (len(bodies(ops)), len(bodies(chat))) == (1, 0)
        await second.tick()  # 5 minutes after the *original* firing: the escalation resumes
        assert len(bodies(chat)) == 1
        nursery.cancel_scope.cancel()


COMMAND = """
[alerting]
interval = "15s"

[channels.run]
type = "command"
command = {command}
timeout = "2s"

[alerts.odd_stage]
expr = 'ferry.queue.depth{{stage="$(touch {marker})"}} > 0'
notify = [{{ channel = "run" }}]
"""


async def test_the_command_channel_passes_text_as_arguments_never_to_a_shell(
    tmp_path: Path, store: Store, mock_clock: trio.testing.MockClock
) -> None:
    out, marker = tmp_path / "out.json", tmp_path / "pwned"
    script = (
        "import json, os, sys; "
        "json.dump({'argv': sys.argv[1:], 'stdin': json.load(sys.stdin), "
        "'env': os.environ['FERRY_ALERT_STATUS']}, open(sys.argv[1], 'w'))"
    )
    command = msgspec.json.encode([sys.executable, "-c", script, str(out), "{summary}"]).decode()
    rig = Rig(parse(COMMAND.format(command=command, marker=marker)), store, mock_clock)
    rig.metrics.queue_depths[f"$(touch {marker})"] = 3
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.alerter.run)
        await rig.evaluated(1)
        nursery.cancel_scope.cancel()
    ran = msgspec.json.decode(out.read_bytes())
    assert ran["argv"][1] == f'odd_stage: ferry.queue.depth{{stage="$(touch {marker})"}} = 3 (> 0)'
    assert ran["stdin"]["alert"] == "odd_stage"
    assert ran["env"] == "firing"
    assert not marker.exists()
    assert rig.alerter.states["odd_stage"].notified == [0]


async def test_a_command_that_overruns_its_timeout_is_killed_and_retried(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    command = msgspec.json.encode([sys.executable, "-c", "import time; time.sleep(60)"]).decode()
    config = parse(
        f"""
[channels.run]
type = "command"
command = {command}
timeout = "2s"

[alerts.stuck]
expr = 'ferry.queue.depth > 0'
notify = [{{ channel = "run" }}]
"""
    )
    rig = Rig(config, store, mock_clock)
    rig.metrics.queue_depths["crm"] = 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.alerter.run)
        deadline = time.monotonic() + 10
        while rig.alerter.evaluations < 1:  # each jump may land while the process is still starting
            mock_clock.jump(1)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert time.monotonic() < deadline
        nursery.cancel_scope.cancel()
    state = rig.alerter.states["stuck"]
    assert state.state == "firing"
    assert state.notified == []  # not taken: tried again at the next evaluation
    assert state.last_error == "run: " + sys.executable + " did not finish within 2s (killed)"
