"""`ferry ctl alerts`: every alert rule's state, firing first (see `actors.alerting.alerter`).

Human output is one row per rule: its state and since when, its value at the last evaluation,
the channels told about the current firing and the next escalation step; `--json` prints the
daemon's answer (`{"alerts": [...]}`). Exit status 0 whatever fires (it is a read).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

import msgspec

from daemon.cli.ctl_client import Client
from daemon.cli.ctl_format import ago as _ago
from daemon.cli.ctl_format import short as _short
from daemon.cli.ctl_format import table as _table


def configure(commands: Any) -> None:
    """Add `alerts` to `ferry ctl`'s subcommands."""
    commands.add_parser("alerts", help="alert rules: what fires, since when, who was told")


def alerts(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Run `ferry ctl alerts`."""
    result = client.request("alerts")
    if args.json:
        out.write(msgspec.json.encode(result).decode() + "\n")
        return 0
    show(result, out)
    return 0


def _value(view: dict[str, Any]) -> str:
    value = view.get("value")
    text = "no data" if value is None else f"{value:g}"
    if view.get("kind") == "anomaly" and view.get("z") is not None:
        text += f" (z {view['z']:.1f})"
    return text


def show(result: Any, out: TextIO) -> None:
    """The human table."""
    views = result["alerts"]
    if not views:
        out.write("no alert rules configured ([alerts.NAME] in the config)\n")
        return
    _table(
        out,
        ["ALERT", "STATE", "SINCE", "VALUE", "SEVERITY", "NOTIFIED", "NEXT", "EXPR"],
        [
            (
                v["name"],
                v["state"].upper() if v["state"] == "firing" else v["state"],
                _ago(v["since"]) if v["state"] != "ok" else "",
                _value(v),
                v["severity"],
                ", ".join(v["notified"]) or "-",
                v["next_step"] or "-",
                _short(v["expr"], 50),
            )
            for v in views
        ],
    )
    firing = sum(v["state"] == "firing" for v in views)
    out.write(
        f"{firing} firing, {sum(v['state'] == 'pending' for v in views)} pending, {len(views)} rule(s)\n"
    )
    for v in views:
        if v["last_error"]:
            out.write(f"{v['name']}: last notification error: {v['last_error']}\n")
