"""The circuit breaker and the AIMD rule: pure state machines walked step by step on a fake clock."""

from __future__ import annotations

import pytest

from daemon.config.limits import AdaptiveConfig, BreakerConfig
from daemon.config.units import Duration
from daemon.limits.breaker import Admit, Breaker, State
from daemon.limits.concurrency import Aimd

POLICY = BreakerConfig(failures=3, rate=0.5, window=Duration(10), min_requests=6, cool_down=Duration(5))

# Steps: ("ok"|"fail"|"probe-ok"|"probe-fail", now) record a result; ("allow", now, expected Admit).
BREAKER_TABLE = [
    pytest.param(
        [("fail", 0), ("fail", 1), ("allow", 1, Admit.YES), ("fail", 2), ("allow", 2, Admit.NO)],
        State.OPEN,
        id="opens after N consecutive failures",
    ),
    pytest.param(
        [("fail", 0), ("fail", 1), ("ok", 2), ("fail", 3), ("fail", 4), ("allow", 4, Admit.YES)],
        State.CLOSED,
        id="a success resets the consecutive count",
    ),
    pytest.param(
        [("ok", 0), ("fail", 1), ("ok", 2), ("fail", 3), ("ok", 4), ("fail", 5)],
        State.OPEN,
        id="opens on the failure rate once min_requests ended in the window",
    ),
    pytest.param(
        [("ok", 0), ("fail", 1), ("ok", 2), ("fail", 13), ("ok", 14), ("fail", 15)],
        State.CLOSED,
        id="results older than the window do not count",
    ),
    pytest.param(
        [*(("fail", t) for t in (0, 0, 0)), ("allow", 4.9, Admit.NO), ("allow", 5, Admit.PROBE)],
        State.HALF_OPEN,
        id="half-opens after the cool-down with a probe",
    ),
    pytest.param(
        [*(("fail", t) for t in (0, 0, 0)), ("allow", 5, Admit.PROBE), ("allow", 6, Admit.NO)],
        State.HALF_OPEN,
        id="only one probe at a time",
    ),
    pytest.param(
        [
            *(("fail", t) for t in (0, 0, 0)),
            ("allow", 5, Admit.PROBE),
            ("probe-ok", 6),
            ("allow", 6, Admit.YES),
        ],
        State.CLOSED,
        id="a good probe closes it",
    ),
    pytest.param(
        [
            *(("fail", t) for t in (0, 0, 0)),
            ("allow", 5, Admit.PROBE),
            ("probe-fail", 6),
            ("allow", 10.9, Admit.NO),
            ("allow", 11, Admit.PROBE),
        ],
        State.HALF_OPEN,
        id="a failed probe reopens it for another cool-down",
    ),
    pytest.param(
        [*(("fail", t) for t in (0, 0, 0)), ("ok", 1), ("ok", 2), ("allow", 2, Admit.NO)],
        State.OPEN,
        id="late results of requests admitted before it opened are ignored",
    ),
    pytest.param(
        [
            *(("fail", t) for t in (0, 0, 0)),
            ("allow", 5, Admit.PROBE),
            ("cancel", 5),
            ("allow", 5, Admit.PROBE),
        ],
        State.HALF_OPEN,
        id="a probe given back is handed out again",
    ),
]


@pytest.mark.parametrize(("steps", "final"), BREAKER_TABLE)
def test_breaker_walks_its_states(steps: list[tuple[object, ...]], final: State) -> None:
    breaker = Breaker(POLICY)
    for step in steps:
        kind, now = step[0], float(step[1])  # type: ignore[arg-type]
        if kind == "allow":
            assert breaker.allow(now) is step[2], f"{step} in {breaker!r}"
        elif kind == "cancel":
            breaker.cancel_probe()
        else:
            assert isinstance(kind, str)
            breaker.record(now, failed=kind.endswith("fail"), probe=kind.startswith("probe"))
    assert breaker.state is final, repr(breaker)


def test_an_open_breaker_says_when_it_probes_and_counts_its_openings() -> None:
    breaker = Breaker(POLICY)
    assert breaker.retry_at == float("-inf")
    for now in (0.0, 1.0, 2.0):
        breaker.record(now, failed=True)
    assert (breaker.retry_at, breaker.opens, breaker.state.label) == (7.0, 1, "open")


# -- AIMD ------------------------------------------------------------------------------------

ADAPTIVE = AdaptiveConfig(floor=2, ceiling=10, initial=4, backoff=0.5, tolerance=2.0, slack=Duration(0.01))


def test_the_limit_grows_by_one_per_window_of_good_answers_while_used() -> None:
    aimd = Aimd(ADAPTIVE)
    for _ in range(5):  # 4 + 1/4 + 1/4.25 + ... crosses 5 on the fifth answer
        aimd.on_result(0.1, overloaded=False, epoch=0, in_flight=4)
    assert aimd.current == 5
    for _ in range(100):
        aimd.on_result(0.1, overloaded=False, epoch=0, in_flight=aimd.current)
    assert aimd.current == 10, "never above the ceiling"


def test_an_unused_limit_does_not_grow() -> None:
    aimd = Aimd(ADAPTIVE)
    for _ in range(50):
        aimd.on_result(0.1, overloaded=False, epoch=0, in_flight=1)
    assert aimd.current == 4


@pytest.mark.parametrize(
    ("latency", "overloaded", "expected"),
    [
        pytest.param(0.1, True, 2, id="429/503/timeout halves"),
        pytest.param(0.25, False, 2, id="latency past tolerance x baseline halves"),
        pytest.param(0.15, False, 4, id="latency within tolerance does not"),
    ],
)
def test_overload_signals_decrease_the_limit(latency: float, overloaded: bool, expected: int) -> None:
    aimd = Aimd(ADAPTIVE)
    aimd.on_result(0.1, overloaded=False, epoch=0, in_flight=1)  # baseline 100 ms
    aimd.on_result(latency, overloaded=overloaded, epoch=aimd.epoch, in_flight=1)
    assert aimd.current == expected


def test_one_decrease_per_congestion_event_and_never_below_the_floor() -> None:
    aimd = Aimd(AdaptiveConfig(floor=2, ceiling=64, initial=32, backoff=0.5))
    started = aimd.epoch
    for _ in range(30):  # thirty timeouts of requests that were all in flight together
        aimd.on_result(5.0, overloaded=True, epoch=started, in_flight=30)
    assert aimd.current == 16
    for _ in range(10):
        aimd.on_result(5.0, overloaded=True, epoch=aimd.epoch, in_flight=1)
    assert aimd.current == 2


def test_small_latencies_are_judged_with_the_slack() -> None:
    aimd = Aimd(ADAPTIVE)
    aimd.on_result(0.001, overloaded=False, epoch=0, in_flight=1)
    assert not aimd.congested(0.008), "7 ms over a 1 ms baseline is noise, not congestion"
    assert aimd.congested(0.02)
