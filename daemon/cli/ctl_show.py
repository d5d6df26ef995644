"""How `ferry ctl` shows each answer to a person (the default output; `--json` prints the answer as is).

One `show_*` function per command answer, each writing to `out`; `progress_bar` draws `replay`'s
progress bar.
"""

from __future__ import annotations

from typing import Any, TextIO

import msgspec

from daemon.cli.ctl_format import ago as _ago
from daemon.cli.ctl_format import short as _short
from daemon.cli.ctl_format import table as _table
from daemon.cli.ctl_format import uptime as _uptime

__all__ = [
    "progress_bar",
    "show_audit",
    "show_dlq_list",
    "show_dlq_show",
    "show_limits",
    "show_nodes",
    "show_pause",
    "show_purge",
    "show_reload",
    "show_retry",
    "show_stats",
    "show_status",
]


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"replaying [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events"


# -- human output ----------------------------------------------------------------------------


def show_status(status: Any, out: TextIO) -> None:
    out.write(f"ferry {status['version']} (pid {status['pid']}), up {_uptime(status['uptime_s'])}\n")
    out.write(f"config   {status['config_path']}  sha256:{status['config_sha256'][:12]}\n")
    out.write(f"paused   {', '.join(status['paused']) or '-'}\n")
    rates = [status.get("received_per_s"), status.get("delivered_per_s")]
    shown = ["-" if rate is None else f"{rate:g}/s" for rate in rates]
    out.write(f"rates    received {shown[0]}, delivered {shown[1]} (last minute)\n")
    if status["draining"]:
        out.write("DRAINING: intake stopped, the daemon stops once the backlog is delivered\n")
    out.write("\n")
    show_nodes(status, out)
    _table(
        out,
        ["ACTOR", "STATE", "RESTARTS", "LAST ERROR"],
        [(a["name"], a["state"], a["restarts"], a["last_error"]) for a in status["actors"]],
    )
    out.write("\n")
    _table(
        out,
        ["STAGE", "KIND", "PENDING", "DELIVERED", "DEAD", ""],
        [
            (name, s["kind"], s["pending"], s["delivered"], s["dead"], "paused" if s["paused"] else "")
            for name, s in status["stages"].items()
        ],
    )
    polls = status.get("polls") or {}
    if polls:
        out.write("\n")
        _table(
            out,
            ["SOURCE", "STATE", "NEXT IN", "ITEMS", "REPEATS", "304s", "FAILURES", "MARK", "LAST ERROR"],
            [
                (
                    name,
                    p["state"] + (" (listing)" if p["listing"] else "") + (" (job)" if p["job"] else ""),
                    "-" if p["next_poll_in_s"] is None else f"{p['next_poll_in_s']:.1f}s",
                    p["items"],
                    p["duplicates"],
                    p["not_modified"],
                    p["failures"],
                    p["mark"] or "-",
                    _short(p["last_error"]),
                )
                for name, p in polls.items()
            ],
        )
    show_limits(status, out)


def show_nodes(status: Any, out: TextIO) -> None:
    """Cluster mode: every node, its last heartbeat and the leases it holds (docs/cluster.md)."""
    nodes = status.get("nodes")
    if nodes is None:
        return
    _table(
        out,
        ["NODE", "HOST", "LISTENER", "HEARTBEAT", "STATE", "LEASES"],
        [
            (
                n["id"] + (" *" if n["this"] else ""),
                n["host"],
                n["address"],
                f"{n['heartbeat_age_s']:.1f}s ago",
                "alive" if n["alive"] else "dead",
                ", ".join(n["leases"]) or "-",
            )
            for n in nodes
        ],
    )
    wake = status.get("wake")
    if wake is not None:
        heard = f"heard {wake['heard']} commit(s) of other nodes"
        if wake["listening"]:
            out.write(f"other nodes' commits wake this node at once ({heard})\n")
        else:
            out.write(
                f"not listening for other nodes' commits: their work waits up to one heartbeat ({heard})\n"
            )
    out.write("\n")


def show_limits(status: Any, out: TextIO) -> None:
    """The rate-limit budgets and each http sink's concurrency and breakers (docs/limits.md)."""
    budgets = status.get("rate_limits") or {}
    if budgets:
        out.write("\n")
        _table(
            out,
            ["RATE LIMIT", "BUDGET", "BURST", "AVAILABLE", "WAITING", "PAUSED", "GRANTED"],
            [
                (
                    name,
                    f"{b['rate']:g}/{b['per_s']:g}s" + (" cluster" if b.get("shared") else ""),
                    b["burst"],
                    f"{b['available']:g}",
                    b["waiting"],
                    f"{b['paused_for_s']:g}s" if b["paused_for_s"] else "-",
                    ", ".join(f"{user} {count}" for user, count in b["granted"].items()) or "-",
                )
                for name, b in budgets.items()
            ],
        )
    guards = status.get("guards") or {}
    if guards:
        out.write("\n")
        rows = []
        for name, g in guards.items():
            limit = f"{g['concurrency']}{' (adaptive)' if g['adaptive'] else ''}"
            for index, e in enumerate(g["endpoints"]):
                retry = f" (probe in {e['retry_in_s']:g}s)" if e["retry_in_s"] is not None else ""
                first = index == 0
                rows.append(
                    (
                        name if first else "",
                        limit if first else "",
                        g["in_flight"] if first else "",
                        e["url"],
                        e["state"] + retry,
                        e["opens"],
                    )
                )
        _table(out, ["SINK", "CONCURRENCY", "IN FLIGHT", "URL", "BREAKER", "OPENED"], rows)


def show_pause(result: Any, out: TextIO) -> None:
    state = "paused" if result["paused"] else "resumed"
    note = "" if result["changed"] else " (it already was)"
    out.write(f"{result['kind']} {result['name']} {state}{note}\n")


def show_dlq_list(result: Any, out: TextIO) -> None:
    items = result["items"]
    _table(
        out,
        ["ID", "SINK", "ATTEMPTS", "STATUS", "DEAD AT", "ERROR"],
        [
            (
                d["id"],
                d["sink"],
                d["attempts"],
                d["last_status"],
                _ago(d["finished_at"]),
                _short(d["last_error"]),
            )
            for d in items
        ],
    )
    out.write(f"{len(items)} of {result['total']} dead letter(s)\n")


def show_dlq_show(result: Any, out: TextIO) -> None:
    d = result["delivery"]
    for label, value in (
        ("id", d["id"]),
        ("sink", d["sink"]),
        ("state", result["state"]),
        ("event", d["event_id"]),
        ("attempts", d["attempts"]),
        ("created", _ago(d["created_at"])),
        ("finished", _ago(d["finished_at"])),
        ("last status", d["last_status"]),
        ("last error", d["last_error"]),
    ):
        out.write(f"{label:<12} {value if value is not None else '-'}\n")
    out.write("payload\n")
    out.write(msgspec.json.format(msgspec.json.encode(d["payload"]), indent=2).decode() + "\n")


def show_retry(result: Any, out: TextIO) -> None:
    per_sink = ", ".join(f"{name} {count}" for name, count in result["by_sink"].items())
    out.write(f"{result['retried']} dead letter(s) pending again{f' ({per_sink})' if per_sink else ''}\n")
    if result["skipped"]:
        out.write(f"{result['skipped']} id(s) skipped: not dead letters of a configured sink\n")


def show_purge(result: Any, out: TextIO) -> None:
    out.write(f"{result['purged']} dead letter(s) purged\n")


def show_stats(result: Any, out: TextIO) -> None:
    stale = any("stale" in c for c in result["stages"].values())
    _table(
        out,
        ["STAGE", "PENDING", "DELIVERED", "DEAD", *(["STALE"] if stale else [])],
        [
            (name, c["pending"], c["delivered"], c["dead"], *([c.get("stale", 0)] if stale else []))
            for name, c in result["stages"].items()
        ],
    )
    if result["failures"]:
        out.write("\n")
        _table(
            out,
            ["STAGE", "STATE", "ERROR TYPE", "COUNT"],
            [(f["stage"], f["state"], f.get("error_type") or "-", f["count"]) for f in result["failures"]],
        )
    if result.get("latency"):
        out.write("\nlatency, creation to delivery (most recent deliveries still stored):\n")
        _table(
            out,
            ["SINK", "COUNT", "P50 MS", "P90 MS", "P99 MS", "MAX MS"],
            [
                (name, q["count"], q["p50_ms"], q["p90_ms"], q["p99_ms"], q["max_ms"])
                for name, q in result["latency"].items()
            ],
        )
    if result["since_start"]:
        out.write("\nsince start:\n")
        _table(
            out,
            ["SINK", "DELIVERED", "RETRIED", "DEAD", *(["STALE"] if stale else [])],
            [
                (name, c["delivered"], c["retried"], c["dead"], *([c.get("stale", 0)] if stale else []))
                for name, c in result["since_start"].items()
            ],
        )
    if result.get("polls"):
        out.write("\npoll sources since start:\n")
        _table(
            out,
            ["SOURCE", "ITEMS", "REPEATS", "REQUESTS", "304s", "LISTINGS", "ERRORS"],
            [
                (
                    name,
                    p["items"],
                    p["duplicates"],
                    p["requests"],
                    p["not_modified"],
                    p["cycles"],
                    ", ".join(f"{kind} {count}" for kind, count in sorted(p["errors"].items())) or "-",
                )
                for name, p in result["polls"].items()
            ],
        )


def show_audit(result: Any, out: TextIO) -> None:
    _table(
        out,
        ["TIME", "UID", "PID", "COMMAND", "ARGUMENTS", "OUTCOME"],
        [
            (_ago(r["at"]), r["uid"], r["pid"], r["command"], _short(r["arguments"], 50), r["outcome"])
            for r in result["rows"]
        ],
    )


def show_reload(result: Any, out: TextIO) -> None:
    out.write(f"reloaded {result['config_path']} (sha256:{result['config_sha256'][:12]})\n")
    rows = [(label, name) for label in ("added", "changed", "removed") for name in result[label]]
    if not rows:
        out.write("nothing changed\n")
    for label, name in rows:
        out.write(f"  {label:<8} {name}\n")
    out.write(f"  {result['unchanged']} component(s) unchanged, still running\n")
    for name in result["not_started"]:
        out.write(f"  {name} has not started yet; see `ferry ctl status`\n")
