"""The control socket against the daemon in-process: framing, bad input, limits, access, audit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.app import serve
from daemon.config.root import load
from daemon.control.server import Access, ControlServer, Peer, socket_path
from daemon.errors import ControlUnavailable
from daemon.running import Running

CONFIG = """
[store]
path = "state/ferry.db"

[listener]
address = "127.0.0.1:0"

[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"
{group}

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable folder: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ferry-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(tmp_path: Path, sock_dir: Path, nursery: trio.Nursery, group: str = "") -> Running:
    config = tmp_path / "ferry.toml"
    config.write_text(CONFIG.format(socket=sock_dir / "ferry.sock", group=group))
    loaded = load(config)
    running: Running = await nursery.start(
        lambda task_status: serve(loaded, handle_signals=False, task_status=task_status)
    )
    return running


@pytest.fixture
async def daemon(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        running = await start(tmp_path, sock_dir, nursery)
        yield running
        running.stop.set()


class Conn:
    """A raw JSON-lines connection to the control socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(json.dumps(message).encode() + b"\n")
        answer = await self.line()
        assert answer is not None, "connection closed without an answer"
        return answer


async def connect(running: Running) -> Conn:
    assert running.control is not None
    return Conn(await trio.open_unix_socket(str(running.control.path)))


async def test_socket_is_0660_replaces_a_stale_one_and_is_removed_on_exit(
    tmp_path: Path, sock_dir: Path
) -> None:
    path = sock_dir / "ferry.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead daemon's socket: the file remains, nobody listens
    async with trio.open_nursery() as nursery:
        running = await start(tmp_path, sock_dir, nursery)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        conn = await connect(running)
        assert (await conn.ask({"v": 1, "cmd": "status"}))["ok"] is True
        running.stop.set()
    assert not path.exists()
    assert os.listdir(sock_dir) == []


async def test_a_live_socket_is_not_taken_over(daemon: Running) -> None:
    assert daemon.control is not None

    async def never(request: Any, call: Any) -> None:
        raise AssertionError

    async def refused(peer: Peer, command: str, outcome: str) -> None:
        raise AssertionError

    second = ControlServer(daemon.control.path, never, access=Access(os.getuid()), refused=refused)
    with pytest.raises(ControlUnavailable, match="another process"):
        await second.run()
    conn = await connect(daemon)
    assert (await conn.ask({"v": 1, "cmd": "status"}))["ok"] is True


async def test_bad_requests_get_errors_and_the_connection_survives(daemon: Running) -> None:
    conn = await connect(daemon)
    for raw, expected in [
        (b"{not json\n", "malformed JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"v": 2, "cmd": "status"}\n', "unsupported protocol version 2"),
        (b'{"cmd": "status"}\n', "unsupported protocol version None"),
        (b'{"v": 1, "cmd": "launch"}\n', "unknown command 'launch'"),
        (b'{"v": 1, "cmd": "pause"}\n', "invalid pause request: Object missing required field `name`"),
        (b'{"v": 1, "cmd": "audit", "limit": 0}\n', "invalid audit request"),
        (b'{"v": 1, "cmd": "status", "extra": 1}\n', "unknown field `extra`"),
        (b'{"v": 1, "cmd": "dlq.show", "id": "nope"}\n', "no delivery with id 'nope'"),
    ]:
        await conn.send(raw)
        answer = await conn.line()
        assert answer is not None
        assert (answer["ok"], answer["v"]) == (False, 1)
        assert expected in answer["error"], (raw, answer)
    status = await conn.ask({"v": 1, "cmd": "status"})
    assert status["ok"] is True
    assert status["result"]["stages"]["out"]["kind"] == "sink"


async def test_an_oversized_request_is_answered_then_the_connection_closes(daemon: Running) -> None:
    conn = await connect(daemon)
    await conn.send(b'{"v": 1, "cmd": "status", "pad": "' + b"x" * 70_000 + b'"}\n')
    answer = await conn.line()
    assert answer == {"error": "request longer than 65536 bytes", "v": 1, "ok": False}
    assert await conn.line() is None
    fresh = await connect(daemon)
    assert (await fresh.ask({"v": 1, "cmd": "status"}))["ok"] is True


async def test_many_clients_at_once_each_get_their_own_answers(daemon: Running) -> None:
    answers: list[tuple[int, dict[str, Any], dict[str, Any]]] = []

    async def client(n: int) -> None:
        conn = await connect(daemon)
        status = await conn.ask({"v": 1, "cmd": "status"})
        audit = await conn.ask({"v": 1, "cmd": "audit", "limit": n + 1})
        answers.append((n, status, audit))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(client, n)
    assert len(answers) == 40
    for _, status, audit in answers:
        assert status["ok"] is True
        assert "actors" in status["result"]
        assert audit == {"v": 1, "ok": True, "result": {"rows": []}}


async def test_a_command_that_overruns_its_timeout_is_answered_with_an_error(sock_dir: Path) -> None:
    async def stuck(request: Any, call: Any) -> None:
        await trio.sleep_forever()

    async def refused(peer: Peer, command: str, outcome: str) -> None:
        raise AssertionError

    server = ControlServer(
        sock_dir / "c.sock", stuck, access=Access(os.getuid()), refused=refused, request_timeout=0.2
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        conn = Conn(await trio.open_unix_socket(str(server.path)))
        answer = await conn.ask({"v": 1, "cmd": "status"})
        assert answer == {"error": "status timed out after 0.2s", "v": 1, "ok": False}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (Peer(pid=1, uid=1000, gid=1000), True),  # the daemon's own user
        (Peer(pid=1, uid=0, gid=0), True),  # root
        (Peer(pid=1, uid=2000, gid=4242), True),  # primary group is the control group
        (Peer(pid=1, uid=2000, gid=2000, groups=(10, 4242)), True),  # supplementary group
        (Peer(pid=1, uid=2000, gid=2000, groups=(10,)), False),
        (Peer(pid=1, uid=65534, gid=65534), False),
    ],
)
def test_access_rules(peer: Peer, allowed: bool) -> None:
    assert Access(uid=1000, gid=4242).allows(peer) is allowed
    if peer.uid not in (0, 1000):
        assert Access(uid=1000).allows(peer) is False


def test_default_socket_moves_to_the_runtime_directory_under_systemd(tmp_path: Path) -> None:
    config = tmp_path / "ferry.toml"
    config.write_text("")
    loaded = load(config)
    assert socket_path(loaded, {}) == tmp_path / "var/ferry.sock"
    assert socket_path(loaded, {"RUNTIME_DIRECTORY": "/run/ferry:/run/other"}) == Path(
        "/run/ferry/ferry.sock"
    )
    config.write_text('[control]\nsocket = "/srv/ctl.sock"\n')
    explicit = load(config)
    assert socket_path(explicit, {"RUNTIME_DIRECTORY": "/run/ferry"}) == Path("/srv/ctl.sock")


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"v": 1, "cmd": "pause", "name": "demo"}\\n')
print(s.makefile().readline())
"""

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another user",
)


async def run_as(uid: int, gid: int, path: Path) -> dict[str, Any]:
    """Run a tiny client as another user (a real peer with other credentials); its answer."""
    done = await trio.run_process(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            CLIENT,
            str(path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def audit_rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(tmp_path / "state/ferry.db")
    try:
        return conn.execute(
            "SELECT uid, pid, command, arguments, outcome FROM audit ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()


@as_root
async def test_another_user_is_refused_and_audited(tmp_path: Path, sock_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(tmp_path, sock_dir, nursery)
        assert running.control is not None
        path = running.control.path
        path.chmod(0o666)  # take the file permissions out of the way: the peer check must hold alone
        answer = await run_as(65534, 65534, path)
        assert answer == {
            "error": "permission denied: uid 65534 may not use this socket",
            "v": 1,
            "ok": False,
        }
        assert running.pauses.sources == set()
        running.stop.set()
    ((uid, pid, command, arguments, outcome),) = audit_rows(tmp_path)
    assert (uid, command, arguments) == (65534, "pause", "{}")
    assert pid > 0
    assert outcome == "refused: uid 65534 is not allowed"


@as_root
async def test_a_member_of_the_control_group_is_allowed(tmp_path: Path, sock_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(tmp_path, sock_dir, nursery, group='group = "65534"')
        assert running.control is not None
        path = running.control.path
        assert os.stat(path).st_gid == 65534
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # group members get in through the file mode
        answer = await run_as(4321, 65534, path)
        assert answer["ok"] is True, answer
        assert running.pauses.sources == {"demo"}
        running.stop.set()
    ((uid, _, command, arguments, outcome),) = audit_rows(tmp_path)
    assert (uid, command, arguments, outcome) == (4321, "pause", '{"name":"demo"}', "ok: demo paused")


async def test_clients_beyond_the_limit_are_turned_away_and_idle_ones_closed(sock_dir: Path) -> None:
    async def echo(request: Any, call: Any) -> str:
        return "pong"

    async def refused(peer: Peer, command: str, outcome: str) -> None:
        raise AssertionError

    server = ControlServer(
        sock_dir / "c.sock",
        echo,
        access=Access(os.getuid()),
        refused=refused,
        max_clients=1,
        idle_timeout=0.3,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        first = Conn(await trio.open_unix_socket(str(server.path)))
        assert await first.ask({"v": 1, "cmd": "stats"}) == {"result": "pong", "v": 1, "ok": True}
        second = Conn(await trio.open_unix_socket(str(server.path)))
        assert await second.line() == {
            "error": "too many control connections; try again",
            "v": 1,
            "ok": False,
        }
        assert await second.line() is None
        assert await first.line() is None  # idle past idle_timeout: closed by the server
        third = Conn(await trio.open_unix_socket(str(server.path)))
        assert (await third.ask({"v": 1, "cmd": "stats"}))["ok"] is True
        nursery.cancel_scope.cancel()
