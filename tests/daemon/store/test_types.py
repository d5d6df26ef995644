"""The store's backend-neutral value helpers (daemon/store/types.py): alert states as rows."""

from __future__ import annotations

import logging

import pytest

from daemon.store.types import AlertState, alert_rows, alert_states


def test_alert_states_round_trip_through_rows() -> None:
    states = {"slow": AlertState(state="firing", since=1.0, fired=2), "dead": AlertState()}
    rows = alert_rows(states, 5.0)
    assert [(rule, at) for rule, _, at in rows] == [("slow", 5.0), ("dead", 5.0)]
    assert alert_states((rule, text) for rule, text, _ in rows) == states


def test_a_row_that_no_longer_decodes_starts_its_rule_afresh(caplog: pytest.LogCaptureFixture) -> None:
    """A newer ferry's (or a damaged) row is left out with a warning naming the rule; the rest load."""
    good = alert_rows({"ok": AlertState(fired=1)}, 0.0)[0][1]
    with caplog.at_level(logging.WARNING, logger="ferry.alerts"):
        loaded = alert_states([("broken", '{"state": "exploded"}'), ("garbage", "{"), ("ok", good)])
    assert loaded == {"ok": AlertState(fired=1)}
    assert sorted(r.fields["rule"] for r in caplog.records) == ["broken", "garbage"]  # type: ignore[attr-defined]
