"""`ferry ctl tap` and `ferry ctl top`: the live views of `ferry ctl` (see `daemon.cli.ctl`).

tap:
    Prints each event passing a source, transform or sink as one JSON line on stdout
    (payloads masked by the daemon) until Ctrl-C or `--limit` events. The daemon's buffer
    for this client is bounded (`--buffer`): when the client reads too slowly the daemon
    drops events rather than slow the pipeline, and the client reports on stderr how many
    were dropped.

top:
    Redraws a summary every `--interval` (default 1 s) from the `status` and `stats`
    commands: per-stage pending, delivered and dead, rates since the previous frame, and
    every actor's state and restarts. DONE is events received for a source and
    deliveries delivered for a sink; RATE is DONE's change per second. `q` or Ctrl-C
    quits; `--once` prints one frame (rates as `-`, there being no previous frame) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any, TextIO

import msgspec

from daemon.cli.ctl_client import Client
from daemon.cli.ctl_format import table as _table
from daemon.cli.ctl_format import uptime as _uptime

TAP_WAIT = 30.0  # the daemon sends at least a heartbeat line every second
_CLEAR = "\x1b[H\x1b[2J"


def configure(commands: Any) -> None:
    """Add `tap` and `top` to `ferry ctl`'s subcommands."""
    tap = commands.add_parser("tap", help="stream live events passing a source, transform or sink (masked)")
    tap.add_argument("name", help="a source, transform or sink")
    tap.add_argument("--limit", type=int, help="stop after this many events")
    tap.add_argument(
        "--buffer",
        type=int,
        default=1024,
        help="events the daemon holds for this client before dropping (default: %(default)s)",
    )
    top = commands.add_parser("top", help="live view of rates, queue depths, actors and restarts")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default: 1)")


# -- tap -------------------------------------------------------------------------------------


def tap(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run `ferry ctl tap`; exit 0 at the limit or on Ctrl-C."""
    encode = msgspec.json.Encoder().encode
    seen = {"events": 0, "dropped": 0, "lines": 0}

    def progress(value: Any) -> None:
        if not seen["lines"]:
            err.write(f"ferry ctl tap: tapping {args.name} (Ctrl-C to stop)\n")
            err.flush()
        seen["lines"] += 1
        for event in value["events"]:
            out.write(encode(event).decode() + "\n")
        seen["events"] += len(value["events"])
        out.flush()
        dropped = value["dropped"]
        if dropped > seen["dropped"]:
            err.write(f"ferry ctl tap: {dropped} event(s) dropped so far (this client reads too slowly)\n")
            err.flush()
            seen["dropped"] = dropped

    try:
        result = client.request(
            "tap", name=args.name, limit=args.limit, buffer=args.buffer, wait=TAP_WAIT, on_progress=progress
        )
    except KeyboardInterrupt:
        result = seen
    except BrokenPipeError:  # stdout closed (`| head`)
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0
    err.write(f"ferry ctl tap: {result['events']} event(s), {result['dropped']} dropped\n")
    return 0


# -- top -------------------------------------------------------------------------------------


def top(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Run `ferry ctl top`; see the module docstring."""
    previous: tuple[float, dict[str, Any]] | None = None
    with _keys() as key:
        try:
            while True:
                status, stats = client.request("status"), client.request("stats")
                now = time.monotonic()
                frame = render(status, stats, previous, now)
                if args.once:
                    out.write(frame)
                    return 0
                out.write(_CLEAR + frame.replace("\n", "\r\n") + "\r\nq: quit\r\n")
                out.flush()
                previous = (now, stats)
                if key(args.interval) in ("q", "Q", "\x03"):
                    return 0
        except KeyboardInterrupt:
            return 0


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """A function `key(timeout)` returning the key pressed within `timeout` (None: none).

    On a terminal, stdin is put in cbreak mode for the duration; otherwise it just waits.
    """
    stdin = sys.stdin
    if not stdin.isatty():

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def key(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode("latin-1") if ready else None

    try:
        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _rate(now: int, before: int | None, seconds: float | None) -> str:
    if before is None or not seconds:
        return "-"
    return f"{max(0, now - before) / seconds:.1f}/s"


def render(
    status: dict[str, Any], stats: dict[str, Any], previous: tuple[float, dict[str, Any]] | None, now: float
) -> str:
    """One frame of `ferry ctl top` as text."""
    from io import StringIO

    seconds = now - previous[0] if previous is not None else None
    before = previous[1] if previous is not None else {}
    out = StringIO()
    stages = status["stages"]
    dead = sum(s["dead"] for s in stages.values())
    pending = sum(s["pending"] for s in stages.values())
    restarts = sum(a["restarts"] for a in status["actors"])
    out.write(
        f"ferry {status['version']} (pid {status['pid']}), up {_uptime(status['uptime_s'])}   "
        f"pending {pending}   dead {dead}   restarts {restarts}"
        f"{'   DRAINING' if status.get('draining') else ''}\n\n"
    )
    received, received_before = stats.get("received", {}), before.get("received", {})
    rows = []
    for name, count in sorted(received.items()):
        rows.append((name, "source", "", count, "", _rate(count, received_before.get(name), seconds), ""))
    sinks, sinks_before = stats.get("since_start", {}), before.get("since_start", {})
    for name, stage in stages.items():
        rate = "-"
        counters = sinks.get(name)
        if counters is not None:
            done = counters["delivered"]
            old = sinks_before.get(name)
            rate = _rate(done, old["delivered"] if old else None, seconds)
        rows.append(
            (
                name,
                stage["kind"],
                stage["pending"],
                stage["delivered"],
                stage["dead"],
                rate,
                "paused" if stage.get("paused") else "",
            )
        )
    _table(out, ["STAGE", "KIND", "PENDING", "DONE", "DEAD", "RATE", ""], rows)
    out.write("\n")
    _table(
        out,
        ["ACTOR", "STATE", "RESTARTS", "LAST ERROR"],
        [(a["name"], a["state"], a["restarts"], _one_line(a["last_error"])) for a in status["actors"]],
    )
    return out.getvalue()


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
