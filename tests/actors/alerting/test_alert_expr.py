"""Alert expressions: parsing (good and bad), and their values over a history of snapshots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from actors.alerting.expr import EMPTY_HIST, ExprError, HistPoint, Reading, Snapshot, Tracker, parse_expr
from daemon.telemetry.metrics import catalogue

KNOWN = catalogue()


@pytest.mark.parametrize(
    ("text", "func", "name", "window", "op", "threshold"),
    [
        ('ferry.queue.depth{stage="crm"} > 1000', "value", "ferry.queue.depth", 0, ">", 1000),
        ('queue_depth{stage="crm"} >= 1', "value", "ferry.queue.depth", 0, ">=", 1),
        ('rate(ferry.deliveries{outcome="dead"}, 5m) > 0.1', "rate", "ferry.deliveries", 300, ">", 0.1),
        ("increase(dead_letters, 1h) > 0", "increase", "ferry.dead_letters", 3600, ">", 0),
        ("p99(ferry.delivery.latency, 5m) > 2", "quantile", "ferry.delivery.latency", 300, ">", 2),
        ("avg(delivery_duration, 30s) < 1e-3", "avg", "ferry.delivery.duration", 30, "<", 0.001),
        ("ferry.actor.restarts != 0", "value", "ferry.actor.restarts", 0, "!=", 0),
        ("rate(events.received, 1m)", "rate", "ferry.events.received", 60, None, None),
    ],
)
def test_parses(text: str, func: str, name: str, window: float, op: str | None, threshold: float) -> None:
    expr = parse_expr(text, KNOWN)
    assert (expr.func, expr.selectors[0].name, expr.window, expr.op, expr.threshold) == (
        func,
        name,
        window,
        op,
        threshold,
    )


def test_parses_matchers_ratio_and_quantile() -> None:
    ratio = parse_expr(
        'ratio(deliveries{outcome="dead", sink!="x"}, deliveries{sink!="x"}, 10m) > 0.05', KNOWN
    )
    assert ratio.selectors[0].matchers == (("outcome", "=", "dead"), ("sink", "!=", "x"))
    assert ratio.selectors[1].matchers == (("sink", "!=", "x"),)
    assert ratio.value_text == 'ratio(deliveries{outcome="dead", sink!="x"}, deliveries{sink!="x"}, 10m)'
    assert parse_expr("quantile(0.75, delivery.latency, 1m) > 1", KNOWN).q == 0.75


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty expression"),
        ("queue_dept > 1", "unknown metric 'queue_dept'"),
        ("rate(ferry.queue.depth, 5m) > 1", "rate() needs a counter; ferry.queue.depth is observable gauge"),
        ("p99(ferry.deliveries, 5m) > 1", "p99() needs a histogram"),
        ("ferry.delivery.latency > 1", "is a histogram: use p99("),
        ("rate(ferry.deliveries, 5) > 1", "needs a unit"),
        ("rate(ferry.deliveries, 5x) > 1", "window '5' needs a unit"),
        ("rate(ferry.deliveries, 0s) > 1", "longer than 0s"),
        ("rate(ferry.deliveries) > 1", "expected"),
        ("ferry.deliveries >", "expected number at the end"),
        ("ferry.deliveries{sink=crm} > 1", "expected string, got 'crm'"),
        ('ferry.deliveries{sink>"crm"} > 1', "use = or !="),
        ("median(ferry.deliveries, 5m) > 1", "unknown function 'median'"),
        ("quantile(1.5, ferry.delivery.latency, 5m) > 1", "not between 0 and 1"),
        ("ferry.deliveries > 1 or 2", "unexpected 'or'"),
        ("ferry.deliveries > 1 $", "unexpected '$'"),
    ],
)
def test_bad_expressions_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ExprError) as caught:
        parse_expr(text, KNOWN)
    assert message in str(caught.value)


def test_threshold_and_anomaly_rules_differ_in_the_comparison() -> None:
    with pytest.raises(ExprError, match="needs a comparison"):
        parse_expr("ferry.deliveries", KNOWN, comparison=True)
    with pytest.raises(ExprError, match="without a comparison"):
        parse_expr("ferry.deliveries > 1", KNOWN, comparison=False)


def snap(**series: Sequence[tuple[Mapping[str, str], Reading]]) -> Snapshot:
    return {f"ferry.{name.replace('__', '.')}": list(values) for name, values in series.items()}


def test_a_selector_sums_matching_series_and_a_missing_counter_reads_zero() -> None:
    tracker = Tracker(parse_expr('ferry.deliveries{outcome!="retry"} > 0', KNOWN))
    assert tracker.observe({}, 0) == 0.0  # a counter nothing has counted yet
    deliveries = [({"outcome": "delivered"}, 5.0), ({"outcome": "dead"}, 2.0), ({"outcome": "retry"}, 9.0)]
    assert tracker.observe(snap(deliveries=deliveries), 1) == 7.0
    gauge = Tracker(parse_expr('ferry.queue.depth{stage="crm"} > 0', KNOWN))
    assert gauge.observe({}, 0) is None  # a gauge never reported: no data
    assert gauge.observe(snap(queue__depth=[({"stage": "crm"}, 3.0), ({"stage": "x"}, 4.0)]), 1) == 3.0


def test_rate_and_increase_cover_the_window_and_survive_a_counter_reset() -> None:
    rate = Tracker(parse_expr("rate(ferry.dead_letters, 10s) > 0", KNOWN))
    increase = Tracker(parse_expr("increase(ferry.dead_letters, 10s) > 0", KNOWN))
    readings = [(0, 0.0), (5, 10.0), (10, 20.0), (15, 3.0), (20, 8.0)]  # a restart between 10 and 15
    values = []
    for now, count in readings:
        snapshot = snap(dead_letters=[({}, count)])
        values.append((rate.observe(snapshot, now), increase.observe(snapshot, now)))
    assert values[0] == (None, None)  # one reading: no window yet
    assert values[1] == (2.0, 10.0)
    assert values[2] == (2.0, 20.0)
    assert values[3] == (13 / 10, 13.0)  # 20 -> 3 is a reset: +3, not -17
    assert values[4] == (8 / 10, 8.0)


def test_ratio_of_increases_and_zero_traffic() -> None:
    tracker = Tracker(
        parse_expr('ratio(ferry.deliveries{outcome="dead"}, ferry.deliveries, 1m) > 0.1', KNOWN)
    )
    assert tracker.observe({}, 0) is None
    assert tracker.observe({}, 10) == 0.0  # nothing happened: no errors of nothing
    deliveries = [({"outcome": "delivered"}, 6.0), ({"outcome": "dead"}, 2.0)]
    assert tracker.observe(snap(deliveries=deliveries), 20) == 0.25


def hist(counts: tuple[int, ...], total: float) -> HistPoint:
    return HistPoint((0.1, 1.0, 10.0), counts, sum(counts), total)


def test_quantile_and_avg_of_the_observations_in_the_window() -> None:
    p50 = Tracker(parse_expr("p50(ferry.delivery.latency, 1m) > 1", KNOWN))
    p99 = Tracker(parse_expr("p99(ferry.delivery.latency, 1m) > 1", KNOWN))
    avg = Tracker(parse_expr("avg(ferry.delivery.latency, 1m) > 1", KNOWN))
    before = snap(delivery__latency=[({"sink": "a"}, hist((100, 0, 0, 0), 5.0))])
    # 100 more observations: 50 in (0.1, 1], 50 in (1, 10]; total sum grows by 300
    after = snap(delivery__latency=[({"sink": "a"}, hist((100, 50, 50, 0), 305.0))])
    for tracker in (p50, p99, avg):
        assert tracker.observe(before, 0) is None
    assert p50.observe(after, 30) == pytest.approx(1.0)
    assert p99.observe(after, 30) == pytest.approx(1 + 9 * 49 / 50)
    assert avg.observe(after, 30) == pytest.approx(3.0)


def test_quantile_with_nothing_observed_is_no_data_and_overflow_is_the_last_bound() -> None:
    tracker = Tracker(parse_expr("p99(ferry.delivery.latency, 1m) > 1", KNOWN))
    assert tracker.observe(snap(delivery__latency=[({}, EMPTY_HIST)]), 0) is None
    assert tracker.observe(snap(delivery__latency=[({}, hist((0, 0, 0, 0), 0))]), 1) is None
    assert tracker.observe(snap(delivery__latency=[({}, hist((0, 0, 0, 4), 400))]), 2) == 10.0


def test_a_gap_in_a_gauge_restarts_its_window() -> None:
    tracker = Tracker(parse_expr("ferry.queue.depth > 0", KNOWN))
    assert tracker.observe(snap(queue__depth=[({}, 5.0)]), 0) == 5.0
    assert tracker.observe({}, 1) is None
    assert tracker.observe(snap(queue__depth=[({}, 6.0)]), 2) == 6.0


@pytest.mark.parametrize(
    "text",
    [
        'ferry.breaker.state{sink="crm"} >= 2',
        "rate(ferry.ratelimit.waits, 5m) > 1",
        "p99(ferry.ratelimit.wait_time, 5m) > 10",
        'increase(ferry.poll.errors{source="crm"}, 15m) > 0',
    ],
)
def test_metrics_registered_by_other_parts_of_ferry_can_be_alerted_on(text: str) -> None:
    assert parse_expr(text, KNOWN).text == text  # the catalogue is read from daemon.telemetry.metrics itself
