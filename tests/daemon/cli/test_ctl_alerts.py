"""`ferry ctl alerts`' human output."""

from __future__ import annotations

import io
from typing import Any

from daemon.cli.ctl_alerts import show


def view(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "r",
        "state": "ok",
        "since": None,
        "value": None,
        "expr": "ferry.queue.depth > 1",
        "kind": "threshold",
        "severity": "warning",
        "for_s": 0.0,
        "notified": [],
        "next_step": None,
        "fired": 0,
        "evaluated_at": None,
        "last_error": None,
        "z": None,
        "mean": None,
    }
    return base | fields


def render(views: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    show({"alerts": views}, out)
    return out.getvalue()


def test_no_rules_says_how_to_add_one() -> None:
    assert render([]) == "no alert rules configured ([alerts.NAME] in the config)\n"


def test_a_table_with_firing_pending_anomaly_and_an_error() -> None:
    text = render(
        [
            view(
                name="backlog",
                state="firing",
                since=0.0,
                value=5000.0,
                notified=["chat"],
                next_step="pager after 900s",
                last_error="pager: HTTP 503",
            ),
            view(name="drop", state="pending", since=60.0, value=3.25, kind="anomaly", z=-4.61),
            view(name="quiet"),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["ALERT", "STATE", "SINCE", "VALUE", "SEVERITY", "NOTIFIED", "NEXT", "EXPR"]
    assert lines[1].startswith("backlog  FIRING   1970-01-01 00:00:00Z  5000")
    assert "chat      pager after 900s" in lines[1]
    assert "3.25 (z -4.6)" in lines[2]
    assert lines[3].startswith("quiet    ok ")
    assert "no data" in lines[3]
    assert lines[4] == "1 firing, 1 pending, 3 rule(s)"
    assert lines[5] == "backlog: last notification error: pager: HTTP 503"
