"""`ferry ctl event ID`: one event's path through the pipeline, sink by sink, for people."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

import msgspec

from daemon.cli.ctl_format import ago as _ago
from daemon.cli.ctl_format import short as _short
from daemon.cli.ctl_format import table as _table


def configure(commands: Any) -> None:
    """Add the `event` command to `ferry ctl`'s subparsers."""
    event = commands.add_parser(
        "event", help="an event, the events derived from it, and each delivery's outcome"
    )
    event.add_argument("id", help="an event id (as a webhook's 202 answer gives it) or a derived one")
    event.add_argument("--payload", action="store_true", help="also print each event's payload (masked)")


def show(result: Any, out: TextIO, args: argparse.Namespace) -> None:
    """Print a `confirmations.EventReport` (decoded from JSON)."""
    for event in result["events"]:
        out.write(f"event {event['id']}  stream {event['stream']}  received {_ago(event['received_at'])}\n")
        if args.payload:
            text = msgspec.json.format(msgspec.json.encode(event["payload"]), indent=2).decode()
            out.write("".join(f"  {line}\n" for line in text.splitlines()))
        deliveries = event["deliveries"]
        if not deliveries:
            out.write("  (no deliveries)\n\n")
            continue
        _table(
            out,
            ["  SINK", "STATE", "ATTEMPTS", "STATUS", "LATENCY", "TOTAL", "WHEN", "RESPONSE / ERROR"],
            [
                (
                    f"  {d['stage']}",
                    d["state"],
                    d["attempts"],
                    d["status"],
                    _ms(d["latency_s"]),
                    _ms(d["finished_at"] - d["created_at"]) if d["finished_at"] is not None else "",
                    _ago(d["finished_at"] or d["next_attempt_at"]),
                    _short(d["error"] or d["response"], 50),
                )
                for d in deliveries
            ],
        )
        out.write("\n")
    for window in result["windows"]:
        key = msgspec.json.encode(window["key"]).decode()
        out.write(
            f"waiting {window['id']}  in a window of transform {window['transform']} (key {_short(key, 40)}, "
            f"{window['size']} event(s), opened {_ago(window['opened_at'])})\n"
        )


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.1f}s"
