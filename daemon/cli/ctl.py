"""`ferry ctl`: steer a running daemon over its control socket (see `daemon.control`).

Output is for people by default and one JSON document per command with `--json`, given
before or after the subcommand (`ferry ctl --json audit` or `ferry ctl audit --json`; the
`result` of the daemon's answer; `drain --json` prints each progress line too).
`replay` draws a progress bar when its output is a terminal.

Exit codes: 0 done; 1 the daemon refused or failed the command (or a drain timed
out with work left); 2 usage error or invalid config; 3 the daemon is not running
(no socket, or nobody listening on it).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import msgspec

from daemon.cli.ctl_client import Client, CommandFailed, NotRunning
from daemon.cli.ctl_show import (
    progress_bar,
    show_audit,
    show_dlq_list,
    show_dlq_show,
    show_pause,
    show_purge,
    show_reload,
    show_retry,
    show_stats,
    show_status,
)
from daemon.config.root import load
from daemon.config.units import Duration
from daemon.control.server import DEFAULT_SOCKET, socket_path
from daemon.errors import ConfigError

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3
SYSTEMD_SOCKET = Path("/run/ferry/ferry.sock")


# -- argument parsing ------------------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        return float(Duration.parse(text))
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _when(text: str) -> float:
    """A point in time as a Unix time: RFC 3339 (`2024-05-01T12:00:00Z`) or a duration ago (`2h`)."""
    try:
        return time.time() - float(Duration.parse(text))
    except (TypeError, ValueError):
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor a duration ago (2h)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add Z or +HH:MM)")
    return moment.timestamp()


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sink", help="only this sink's (or transform's) dead letters")
    parser.add_argument("--since", type=_duration, help="only dead-lettered within this long, e.g. 1h")
    parser.add_argument("--error", help="only those whose last error contains this text (any case)")


def configure(ctl: argparse.ArgumentParser) -> None:
    """Add `ferry ctl`'s options and commands to its subparser."""
    ctl.add_argument("-c", "--config", default="config.toml", help="config file naming the socket")
    ctl.add_argument("--socket", type=Path, help="control socket path (instead of reading the config)")
    ctl.add_argument("--json", action="store_true", help="print results as JSON")
    commands = ctl.add_subparsers(dest="ctl_command", required=True)
    commands.add_parser("status", help="version, uptime, config, actors, queue depths, paused components")
    for verb in ("pause", "resume"):
        sub = commands.add_parser(verb, help=f"{verb} a source (webhook or poll) or a sink")
        sub.add_argument("name")
    dlq = commands.add_parser("dlq", help="the dead-letter queue").add_subparsers(
        dest="dlq_command", required=True
    )
    listing = dlq.add_parser("list", help="dead letters, newest first")
    _filters(listing)
    listing.add_argument("--limit", type=int, default=50)
    dlq.add_parser("show", help="one delivery with its payload").add_argument("id")
    retry = dlq.add_parser("retry", help="make dead letters pending again (same delivery ids)")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    _filters(retry)
    purge = dlq.add_parser("purge", help="delete dead letters (all matching the filters, or by id)")
    purge.add_argument("ids", nargs="*", metavar="ID")
    _filters(purge)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    commands.add_parser("stats", help="counts by outcome per stage, failures by last status")
    audit = commands.add_parser("audit", help="the control audit trail")
    audit.add_argument("--limit", type=int, default=20)
    commands.add_parser(
        "reload", help="re-read the config file and apply it (a bad file changes nothing; errors are shown)"
    )
    replay = commands.add_parser(
        "replay", help="deliver a source's stored events again (new delivery ids) to its sinks"
    )
    replay.add_argument("--source", required=True, help="the source whose events to replay")
    replay.add_argument("--since", type=_when, help="received at or after: RFC 3339 or a duration ago")
    replay.add_argument("--until", type=_when, help="received before: RFC 3339 or a duration ago")
    replay.add_argument("--to", metavar="SINK", help="only this sink (default: every sink downstream)")
    drain = commands.add_parser("drain", help="stop intake, deliver what is due, then stop the daemon")
    drain.add_argument("--timeout", type=_duration, default=60.0, help="default: %(default)ss")
    from daemon.cli import ctl_event, ctl_live

    ctl_live.configure(commands)
    ctl_event.configure(commands)
    from daemon.cli import ctl_alerts

    ctl_alerts.configure(commands)
    _json_anywhere(commands)


def _json_anywhere(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Accept `--json` after the subcommand too (`ferry ctl audit --json`), as well as before it."""
    for sub in set(commands.choices.values()):
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _json_anywhere(action)


def _resolve_socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    loaded = load(args.config, read_secrets=False)  # the socket is all ctl needs; secrets may be unreadable
    path = socket_path(loaded)
    default = loaded.path is not None and path == loaded.path.parent / DEFAULT_SOCKET
    if default and not path.exists() and SYSTEMD_SOCKET.exists():
        return SYSTEMD_SOCKET  # the daemon runs under systemd, which put it in RuntimeDirectory=ferry
    return path


def main(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one `ferry ctl` command; see the module docstring for exit codes."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        path = _resolve_socket(args)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration", file=err)
        for problem in exc.problems:
            print(f"  {problem}", file=err)
        return EXIT_USAGE
    try:
        with Client(path) as client:
            return _command(client, args, out, err)
    except NotRunning as exc:
        print(str(exc), file=err)
        return EXIT_NOT_RUNNING
    except CommandFailed as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILED


def _command(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    command = args.ctl_command
    emit = _emitter(args.json, out)
    if command == "status":
        emit(client.request("status"), show_status)
    elif command in ("pause", "resume"):
        emit(client.request(command, name=args.name), show_pause)
    elif command == "stats":
        emit(client.request("stats"), show_stats)
    elif command == "audit":
        emit(client.request("audit", limit=args.limit), show_audit)
    elif command == "reload":
        emit(client.request("reload"), show_reload)
    elif command == "drain":
        return _drain(client, args, out)
    elif command == "replay":
        return _replay(client, args, out)
    elif command == "dlq":
        return _dlq(client, args, out, err, emit)
    elif command == "event":
        from daemon.cli import ctl_event

        emit(client.request("event", id=args.id), lambda result, out: ctl_event.show(result, out, args))
    elif command == "alerts":
        from daemon.cli import ctl_alerts

        return ctl_alerts.alerts(client, args, out)
    elif command in ("tap", "top"):
        from daemon.cli import ctl_live

        return ctl_live.tap(client, args, out, err) if command == "tap" else ctl_live.top(client, args, out)
    return 0


def _emitter(as_json: bool, out: TextIO) -> Callable[[Any, Callable[[Any, TextIO], None]], None]:
    def emit(result: Any, human: Callable[[Any, TextIO], None]) -> None:
        if as_json:
            out.write(msgspec.json.encode(result).decode() + "\n")
        else:
            human(result, out)

    return emit


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    return {"sink": args.sink, "since": args.since, "error": args.error}


def _dlq(
    client: Client,
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    emit: Callable[[Any, Callable[[Any, TextIO], None]], None],
) -> int:
    sub = args.dlq_command
    if sub == "list":
        emit(client.request("dlq.list", limit=args.limit, **_selection(args)), show_dlq_list)
    elif sub == "show":
        emit(client.request("dlq.show", id=args.id), show_dlq_show)
    elif sub == "retry":
        if not args.ids and not args.all:
            print("dlq retry: name delivery ids, or pass --all (with optional filters)", file=err)
            return EXIT_USAGE
        emit(client.request("dlq.retry", ids=args.ids, all=not args.ids, **_selection(args)), show_retry)
    elif sub == "purge":
        selection = {"ids": args.ids, "all": not args.ids, **_selection(args)}
        if not args.yes:
            if not sys.stdin.isatty():
                print("dlq purge: refusing without --yes when stdin is not a terminal", file=err)
                return EXIT_USAGE
            count = client.request("dlq.purge", dry_run=True, **selection)["purged"]
            answer = input(f"Purge {count} dead letter(s)? This cannot be undone. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing purged", file=err)
                return EXIT_FAILED
        emit(client.request("dlq.purge", **selection), show_purge)
    return 0


def _drain(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    def progress(value: Any) -> None:
        if args.json:
            out.write(msgspec.json.encode({"progress": value}).decode() + "\n")
        else:
            stages = ", ".join(f"{name} {count}" for name, count in value["by_stage"].items())
            out.write(
                f"draining: {value['outstanding']} outstanding ({stages}) after {value['elapsed_s']:.1f}s\n"
            )
        out.flush()

    result = client.request("drain", wait=args.timeout + 60, on_progress=progress, timeout=args.timeout)
    if args.json:
        out.write(msgspec.json.encode(result).decode() + "\n")
    elif result["drained"]:
        out.write(f"drained in {result['elapsed_s']:.1f}s; the daemon is stopping\n")
    else:
        out.write(
            f"timed out after {result['elapsed_s']:.1f}s with {result['outstanding']} outstanding "
            f"({', '.join(f'{n} {c}' for n, c in result['by_stage'].items())}); the daemon is stopping\n"
        )
    return 0 if result["drained"] else EXIT_FAILED


def _replay(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    bar = not args.json and out.isatty()

    def progress(value: Any) -> None:
        out.write(f"\r{progress_bar(value['events'], value['total'])}")
        out.flush()

    result = client.request(
        "replay",
        on_progress=progress if bar else None,
        source=args.source,
        since=args.since,
        until=args.until,
        to=args.to,
    )
    if bar and result["events"]:
        out.write("\n")
    if args.json:
        out.write(msgspec.json.encode(result).decode() + "\n")
    elif not result["events"]:
        out.write(f"replay {result['replay']}: no stored events of {args.source} in that window\n")
    else:
        per_sink = ", ".join(f"{name} {count}" for name, count in result["by_sink"].items())
        out.write(
            f"replay {result['replay']}: {result['events']} event(s), {result['deliveries']} new "
            f"deliveries ({per_sink}), ids ending .r{result['replay']}\n"
        )
    return 0
