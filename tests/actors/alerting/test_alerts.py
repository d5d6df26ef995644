"""The alert state machine on a fake clock: pending, firing, escalation, resolution, anomalies."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest

from actors.alerting.rules import RESOLVE_TRIES, AlertState, Notice, Rule, compile_rule, evaluate, sent, view
from daemon.config.root import parse
from daemon.telemetry.metrics import catalogue

KNOWN = catalogue()


def rule(body: str, name: str = "r") -> Rule:
    config = parse(f"[channels.hook]\ntype = 'webhook'\nurl = 'http://127.0.0.1:1/'\n[alerts.{name}]\n{body}")
    return compile_rule(name, config.alerts[name], KNOWN)


BACKLOG = """
expr = "ferry.queue.depth > 100"
for = "5m"
notify = [{channel = "log"}, {channel = "hook", after = "10m"}]
"""


def run(r: Rule, state: AlertState, readings: Sequence[tuple[float, float | None]]) -> list[list[Notice]]:
    """Evaluate at each (time, value), marking every notice as taken by its channel."""
    batches = []
    for now, value in readings:
        notices = evaluate(r, state, value, now)
        for notice in notices:
            sent(state, notice, None)
        batches.append(notices)
    return batches


def test_fires_after_for_notifies_each_step_once_escalates_and_resolves() -> None:
    r, state = rule(BACKLOG), AlertState()
    timeline = [(0, 50), (60, 150), (200, 160), (360, 170), (400, 180), (960, 190), (1000, 200), (1100, 20)]
    batches = run(r, state, timeline)
    kinds = [[(n.status, n.channel, n.step) for n in batch] for batch in batches]
    assert kinds == [
        [],  # below
        [],  # pending since 60
        [],  # still pending (140 s < 5m)
        [("firing", "log", 0)],  # 300 s after 60: fires, step 0 at once
        [],  # one notification per firing: nothing new
        [("firing", "hook", 1)],  # 600 s after firing at 360: escalates
        [],
        [("resolved", "log", None), ("resolved", "hook", None)],
    ]
    assert state.state == "ok"
    assert state.fired == 1
    resolved = batches[-1][0]
    assert (resolved.since, resolved.at, resolved.value) == (360, 1100, 20)
    assert run(r, state, [(1200, 20)]) == [[]]  # told once


def test_a_condition_that_clears_while_pending_sends_nothing() -> None:
    r, state = rule(BACKLOG), AlertState()
    assert run(r, state, [(0, 500), (100, 500), (200, 5), (300, 500)]) == [[], [], [], []]
    assert state.state == "pending"
    assert state.since == 300  # the clock restarted


def test_no_data_holds_the_state_it_neither_resolves_nor_fires() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    run(r, state, [(0, 500)])
    assert state.state == "firing"
    assert run(r, state, [(10, None), (20, None)]) == [[], []]
    assert state.state == "firing"
    assert state.value is None


def test_a_failed_notification_is_retried_once_per_evaluation_until_taken() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    first = evaluate(r, state, 500, 0)
    sent(state, first[0], "HTTP 503")
    assert state.last_error == "log: HTTP 503"
    again = evaluate(r, state, 500, 15)
    assert [(n.channel, n.step) for n in again] == [("log", 0)]  # one retry per evaluation, no burst
    sent(state, again[0], None)
    assert evaluate(r, state, 500, 30) == []
    assert state.notified == [0]


def test_resolved_notices_go_to_the_channels_told_and_give_up_after_some_tries() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    run(r, state, [(0, 500)])  # only step 0 (log) was told; hook's step is 10 minutes away
    notices = evaluate(r, state, 1, 10)
    assert [(n.status, n.channel) for n in notices] == [("resolved", "log")]
    for attempt in range(RESOLVE_TRIES):
        sent(state, notices[0], "down")
        notices = evaluate(r, state, 1, 20 + attempt)
        if attempt < RESOLVE_TRIES - 1:
            assert [n.channel for n in notices] == ["log"]
    assert notices == []


def test_firing_again_starts_a_new_firing_with_every_step() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    run(r, state, [(0, 500), (10, 1)])
    batches = run(r, state, [(20, 500)])
    assert [(n.status, n.step) for n in batches[0]] == [("firing", 0)]
    assert state.fired == 2


def test_state_round_trips_as_json_and_older_rows_load() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    run(r, state, [(0, 500)])
    copy = msgspec.json.decode(msgspec.json.encode(state), type=AlertState)
    assert copy == state
    assert msgspec.json.decode(b'{"state": "firing", "since": 5}', type=AlertState).notified == []


def test_view_shows_who_was_told_and_what_comes_next() -> None:
    r, state = rule(BACKLOG.replace('"5m"', '"0s"')), AlertState()
    run(r, state, [(0, 500)])
    shown = view(r, state)
    assert (shown.state, shown.notified, shown.next_step, shown.kind) == (
        "firing",
        ["log"],
        "hook after 600s",
        "threshold",
    )


ANOMALY = """
expr = "rate(ferry.events.received, 1m)"
for = "2m"
anomaly = {{ z = 3, direction = "{direction}", half_life = "1h", warmup = "10m" }}
notify = [{{channel = "log"}}]
"""


def noisy(t: float) -> float:
    return 100 + (5 if int(t / 60) % 2 else -5)  # 95, 105, 95, ... every minute


@pytest.mark.parametrize("direction", ["above", "both"])
def test_anomaly_fires_when_the_z_score_stays_high_and_resolves_when_back_to_normal(direction: str) -> None:
    r, state = rule(ANOMALY.format(direction=direction)), AlertState()
    normal = [(t, noisy(t)) for t in range(0, 3600, 60)]
    assert all(batch == [] for batch in run(r, state, normal))
    assert state.mean == pytest.approx(100, abs=3)
    assert 3 < (state.variance**0.5) < 7
    spike = run(r, state, [(3600, 200), (3660, 210), (3720, 220)])
    assert spike[0] == []
    assert spike[1] == []
    assert [(n.status, n.channel) for n in spike[2]] == [("firing", "log")]
    assert state.z is not None
    assert state.z > 3
    back = run(r, state, [(3780, 100)])
    assert [n.status for n in back[0]] == ["resolved"]


def test_anomaly_direction_below_and_warmup() -> None:
    r, state = rule(ANOMALY.format(direction="below").replace('for = "2m"', 'for = "0s"')), AlertState()
    assert run(r, state, [(0, 100), (60, 0)]) == [[], []]  # warming up: a drop does not count yet
    run(r, state, [(t, noisy(t)) for t in range(120, 3600, 60)])
    assert run(r, state, [(3600, 300)]) == [[]]  # above is not "below"
    fired = run(r, state, [(3660, 0)])
    assert [n.status for n in fired[0]] == ["firing"]


def test_anomaly_on_a_flat_history_fires_on_any_change_unless_min_stddev() -> None:
    flat = rule(ANOMALY.format(direction="both").replace('for = "2m"', 'for = "0s"'))
    state = AlertState()
    run(flat, state, [(t, 10.0) for t in range(0, 1200, 60)])
    assert [n.status for n in run(flat, state, [(1200, 10.5)])[0]] == ["firing"]
    floored = rule(
        ANOMALY.format(direction="both")
        .replace('for = "2m"', 'for = "0s"')
        .replace("z = 3,", "z = 3, min_stddev = 1,")
    )
    state = AlertState()
    run(floored, state, [(t, 10.0) for t in range(0, 1200, 60)])
    assert run(floored, state, [(1200, 10.5)]) == [[]]
