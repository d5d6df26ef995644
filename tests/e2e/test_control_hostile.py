"""The control socket against hostile peers, on the real daemon process.

A refused peer always leaves an audit row with its uid, whatever it sends; an allowed peer gets
an answer to every request (never a dropped connection, never a traceback in the log). Acting
as another user needs root and `setpriv` (the suite runs as root).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import ROOT, Daemon, ctl_json, write_config

CONFIG = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""

DEEP = b'{"v": 1, "cmd": "pause", "name": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
HUGE = b'{"v": 1, "cmd": "status", "pad": "' + b"x" * (1024 * 1024) + b'"}'
CLIENT = """
import socket, sys, threading
payload = sys.stdin.buffer.read()
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def send():
    try:
        s.sendall(payload)
    except OSError:
        pass  # the daemon may close before reading it all (a line too long)
threading.Thread(target=send, daemon=True).start()
print(s.makefile().readline())
"""


@pytest.fixture
def daemon(tmp_path: Path, sock_dir: Path) -> Iterator[Daemon]:
    sock_dir.chmod(0o755)
    config = write_config(tmp_path, CONFIG.format(socket=sock_dir / "ferry.sock"))
    running = Daemon(config, tmp_path / "daemon.log").start()
    (sock_dir / "ferry.sock").chmod(0o666)  # the file mode out of the way: the peer check must hold
    yield running
    running.stop()


def as_nobody(path: Path, payload: bytes) -> dict[str, Any]:
    """Send `payload` as uid 65534 (a real peer with other credentials); the daemon's answer."""
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            CLIENT,
            str(path),
        ],
        input=payload,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def send_ignoring_close(sock: socket.socket, payload: bytes) -> None:
    with contextlib.suppress(OSError):  # the daemon closes the connection before reading it all
        sock.sendall(payload)


@pytest.mark.parametrize(
    ("payload", "command"),
    [
        (DEEP + b"\n", "connect"),
        (b"[" * 10_000 + b"\n", "connect"),
        (b'{"v": 1, "cmd": "drain", "x": ' + b"{" * 5_000 + b"\n", "connect"),
        (HUGE + b"\n", "connect"),
        (b'"just a string"\n', "connect"),
        (b"\xff\xfe not json\n", "connect"),
        (b"", "connect"),  # connects, sends nothing, hangs up
        (b'{"v": 1, "cmd": "dlq.purge", "all": true}\n', "dlq.purge"),
    ],
    ids=[
        "nested-10000",
        "open-brackets",
        "deep-args",
        "huge-line",
        "not-an-object",
        "garbage",
        "silent",
        "valid",
    ],
)
def test_a_refused_peer_is_audited_with_its_uid_whatever_it_sends(
    daemon: Daemon, sock_dir: Path, payload: bytes, command: str
) -> None:
    answer = as_nobody(sock_dir / "ferry.sock", payload)
    assert answer == {"v": 1, "ok": False, "error": "permission denied: uid 65534 may not use this socket"}
    rows = [row for row in ctl_json(daemon.config_path, "audit")["rows"] if row["uid"] == 65534]
    assert [(row["command"], row["outcome"]) for row in rows] == [
        (command, "refused: uid 65534 is not allowed")
    ]
    assert not [line for line in daemon.logs() if line.get("level") == "error" or "traceback" in line]


def test_an_allowed_peer_gets_an_answer_to_every_request(daemon: Daemon, sock_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_dir / "ferry.sock"))
        lines = sock.makefile("rb")

        def ask(raw: bytes) -> dict[str, Any]:
            sock.sendall(raw + b"\n")
            answer: dict[str, Any] = json.loads(lines.readline())
            return answer

        cases = {
            DEEP: "malformed JSON: nested too deeply",
            b'{"v": 1, "cmd": "status", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}": "nested too deeply",
            b"{not json": "malformed JSON",
            b"[1, 2, 3]": "a request must be a JSON object",
            b"42": "a request must be a JSON object",
            b'{"v": 1, "cmd": "launch"}': "unknown command 'launch'",
            b'{"v": 1, "cmd": ' + b"[" * 900 + b"]" * 900 + b"}": "unknown command",
            b'{"v": 1, "cmd": "pause", "name": ' + b"[" * 900 + b"]" * 900 + b"}": "invalid pause request",
            b'{"v": 2, "cmd": "status"}': "unsupported protocol version 2",
        }
        for raw, error in cases.items():
            answer = ask(raw)
            assert answer["ok"] is False, raw[:60]
            assert error in answer["error"], (raw[:60], answer)
        assert ask(b'{"v": 1, "cmd": "stats"}')["ok"] is True  # the same connection still serves
        sender = threading.Thread(target=send_ignoring_close, args=(sock, HUGE + b"\n"))
        sender.start()  # the daemon answers and closes before it has read all of it
        answer = json.loads(lines.readline())
        sender.join(30)
        assert answer == {"v": 1, "ok": False, "error": "request longer than 65536 bytes"}
    assert daemon.proc is not None  # started
    assert ctl_json(daemon.config_path, "status")["pid"] == daemon.proc.pid
    assert not [line for line in daemon.logs() if line.get("level") == "error" or "traceback" in line]


def test_json_is_accepted_before_and_after_the_subcommand(daemon: Daemon) -> None:
    config = str(daemon.config_path)
    for args in (
        ["--json", "audit"],
        ["audit", "--json"],
        ["audit", "--limit", "5", "--json"],
        ["--json", "dlq", "list"],
        ["dlq", "list", "--json"],
        ["stats", "--json"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "ctl", "-c", config, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (args, done.stderr)
        assert isinstance(json.loads(done.stdout), dict), args
    people = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "ctl", "-c", config, "audit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert people.returncode == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(people.stdout or "not json")
