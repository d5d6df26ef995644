"""The real daemon process as systemd sees it: sd_notify datagrams in order, socket activation."""

from __future__ import annotations

import itertools
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, write_config

PIPELINE = """
[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""

# What systemd does for a socket-activated service, in a few lines: the listening socket becomes
# fd 3, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES describe it, then the daemon is exec'd in the same pid.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="webhook")
os.execv(sys.argv[2], sys.argv[2:])
"""


SO_TIMESTAMPNS = 35  # Linux (asm-generic and x86); also the SCM type of its ancillary data
TIMESPEC = struct.Struct("@qq")


class NotifySocket:
    """A receiving sd_notify socket in the abstract namespace, recording every datagram with its time.

    The time is the kernel's, taken when the datagram was queued (`SO_TIMESTAMPNS`, wall clock):
    a test that reads a while later (it was busy, or not scheduled) still sees when it was sent."""

    def __init__(self) -> None:
        self.address = f"@ferry-e2e-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind("\0" + self.address[1:])
        self.seen: list[tuple[float, str]] = []

    def receive(self) -> tuple[float, str]:
        """The next datagram (blocking, within the socket's timeout) and when it was queued."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(TIMESPEC.size))
        stamps = [d for level, kind, d in ancillary if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)]
        assert stamps, "no kernel timestamp on the datagram"
        seconds, nanoseconds = TIMESPEC.unpack(stamps[0][: TIMESPEC.size])
        return seconds + nanoseconds / 1e9, data.decode()

    def until(self, predicate: str, timeout: float = 20.0) -> list[tuple[float, str]]:
        """Receive until a datagram starts with `predicate`'s line; everything received so far."""
        deadline = time.monotonic() + timeout
        while not any(predicate in text.split("\n") for _, text in self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"{predicate} not received within {timeout}s; got {[t for _, t in self.seen]}"
            self.sock.settimeout(left)
            try:
                received = self.receive()
            except TimeoutError:
                continue
            self.seen.append(received)
        return self.seen

    def index(self, line: str) -> int:
        return next(i for i, (_, text) in enumerate(self.seen) if line in text.split("\n"))


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    receiver = NotifySocket()
    yield receiver
    receiver.sock.close()


def test_systemd_sees_ready_status_watchdog_then_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, PIPELINE)
    daemon = Daemon(
        config, tmp_path / "ferry.log", env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"}
    )
    daemon.start()
    try:
        notify.until("READY=1")
        host, port = daemon.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):  # already accepting
            pass
        response = httpx.post(f"{daemon.url}/hooks/demo", json={"n": 1}, timeout=5)
        assert response.status_code == 202

        ready_at = notify.seen[notify.index("READY=1")][0]
        deadline = time.monotonic() + 10
        while sum(t > ready_at and text == "WATCHDOG=1" for t, text in notify.seen) < 10:
            assert time.monotonic() < deadline, "fewer than 10 watchdog pings in 10s at a 0.1s interval"
            notify.sock.settimeout(1)
            notify.seen.append(notify.receive())
        pings = [t for t, text in notify.seen if text == "WATCHDOG=1" and t > ready_at]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.05 < sorted(gaps)[len(gaps) // 2] < 0.2, gaps  # median gap: half WATCHDOG_USEC

        daemon.signal(signal.SIGTERM)
        notify.until("STOPPING=1")
        assert daemon.wait() == 0
    finally:
        daemon.stop()

    texts = [text for _, text in notify.seen]
    ready = notify.index("READY=1")
    stopping = notify.index("STOPPING=1")
    assert ready < stopping
    assert (
        texts[ready] == "READY=1\nSTATUS=serving 1 webhook source(s)"
    )  # poll sources: tests/daemon/test_app_status.py
    assert [i for i, text in enumerate(texts) if "READY=1" in text.split("\n")] == [ready]  # sent once
    summaries = [text for text in texts[ready + 1 : stopping] if text.startswith("STATUS=")]
    assert summaries
    assert summaries[0].endswith("since start; 0 pending")
    assert texts[stopping].startswith("STOPPING=1\nSTATUS=stopping")


def test_a_watchdog_meant_for_another_process_is_not_pinged(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, PIPELINE)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    daemon = Daemon(config, tmp_path / "ferry.log", env=env).start()
    try:
        notify.until("READY=1")
        daemon.signal(signal.SIGTERM)
        notify.until("STOPPING=1")
    finally:
        daemon.stop()
    assert all(text != "WATCHDOG=1" for _, text in notify.seen)


def test_socket_activated_daemon_serves_webhooks_on_the_passed_socket(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    host, port = server.getsockname()
    config = write_config(tmp_path, PIPELINE)  # its [listener] address is another, free port
    daemon = Daemon(
        config,
        tmp_path / "ferry.log",
        launcher=[sys.executable, "-c", ACTIVATE, str(server.fileno())],
        pass_fds=(server.fileno(),),
    )
    try:
        daemon.start()
        server.close()  # the daemon holds its own copy, as a socket unit would
        assert daemon.address == f"{host}:{port}"
        response = httpx.post(f"http://{host}:{port}/hooks/demo", json={"n": 1}, timeout=5)
        assert response.status_code == 202, response.text
        ready = daemon.wait_log(lambda line: line.get("msg") == "ready")
        assert ready["listener"] == [f"{host}:{port}"]
    finally:
        server.close()
        daemon.stop()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0


def test_an_unusable_activated_socket_stops_the_daemon_with_a_clear_error(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    config = write_config(tmp_path, PIPELINE)
    daemon = Daemon(
        config,
        tmp_path / "ferry.log",
        launcher=[sys.executable, "-c", ACTIVATE, str(udp.fileno())],
        pass_fds=(udp.fileno(),),
    )
    with pytest.raises(AssertionError, match="daemon exited with 1"):
        daemon.start()
    udp.close()
    failed = daemon.wait_log(lambda line: line.get("msg") == "daemon failed")
    assert failed["kind"] == "ActivationError"
    assert "fd 3 (webhook) must be a TCP socket" in failed["error"]
