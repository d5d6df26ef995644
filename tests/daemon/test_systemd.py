"""sd_notify and socket activation against real sockets: what systemd would receive and pass."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio.testing

from daemon.errors import ActivationError
from daemon.systemd import ActivatedSockets, ListenFd, Notifier, _adopt, parse_listen_fds, watchdog_interval

PID = 4242


@pytest.fixture
def systemd() -> Iterator[tuple[str, socket.socket]]:
    """A receiving sd_notify socket in the abstract namespace: (`NOTIFY_SOCKET` value, socket)."""
    name = f"@ferry-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.setblocking(False)
    yield name, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.stopping()
    assert repr(notifier) == "<Notifier disabled>"


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", ""])
def test_an_address_sd_notify_would_not_accept_disables_notifications(address: str) -> None:
    assert not Notifier({"NOTIFY_SOCKET": address}).enabled


def test_path_socket_receives_ready_with_status() -> None:
    path = f"/tmp/ferry-{uuid.uuid4().hex[:12]}.sock"  # AF_UNIX paths are limited to 108 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        try:
            notifier = Notifier({"NOTIFY_SOCKET": path})
            notifier.ready("serving 2 webhook and 1 poll source(s)")
            assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 webhook and 1 poll source(s)"
            notifier.close()
        finally:
            os.unlink(path)


def test_each_notification_is_one_datagram_in_systemds_format(systemd: tuple[str, socket.socket]) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready()
    notifier.status("3 events\nreceived")  # a newline would start a new KEY=VALUE: folded
    notifier.stopping("stopping")
    assert received(sock) == ["READY=1", "STATUS=3 events received", "STOPPING=1\nSTATUS=stopping"]


def test_reload_sends_reloading_with_monotonic_usec_then_ready(systemd: tuple[str, socket.socket]) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloaded("config reloaded")
    reloading, ready = received(sock)
    key, usec = reloading.split("\n")
    assert key == "RELOADING=1"
    assert usec.startswith("MONOTONIC_USEC=")
    assert before <= int(usec.removeprefix("MONOTONIC_USEC=")) <= after
    assert ready == "READY=1\nSTATUS=config reloaded"


def test_a_full_socket_buffer_never_blocks_the_sender(systemd: tuple[str, socket.socket]) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    started = time.monotonic()
    for _ in range(10_000):  # nobody reads: the receive queue fills up after a few hundred
        notifier.notify("WATCHDOG=1")
    assert time.monotonic() - started < 5
    assert received(sock)


def test_sending_after_systemd_went_away_is_silent(systemd: tuple[str, socket.socket]) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    sock.close()
    notifier.notify("WATCHDOG=1")  # ECONNREFUSED, ignored


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(PID)}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_is_half_watchdog_usec_for_this_process_only(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, PID) == expected


async def test_keep_alive_pings_at_the_interval_until_cancelled(
    systemd: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    assert repr(notifier) == f"<Notifier '{address}' [watchdog every 0.1s]>"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.keep_alive)
        await trio.sleep(1.05)
        nursery.cancel_scope.cancel()
    assert received(sock) == ["WATCHDOG=1"] * 11  # at 0, 0.1, ..., 1.0


async def test_keep_alive_returns_at_once_without_a_watchdog(systemd: tuple[str, socket.socket]) -> None:
    address, sock = systemd
    with trio.fail_after(1):
        await Notifier({"NOTIFY_SOCKET": address}).keep_alive()
    assert received(sock) == []


async def test_status_reports_the_summary_now_and_every_interval(
    systemd: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    address, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    calls = 0

    async def summary() -> str:
        nonlocal calls
        calls += 1
        return f"{calls} events received"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.report_status, summary, 10.0)
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert received(sock) == [f"STATUS={n} events received" for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"LISTEN_FDS": "1"}, []),  # no LISTEN_PID: not for us
        ({"LISTEN_PID": str(PID)}, []),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "1"}, []),  # inherited from the process it was meant for
        ({"LISTEN_FDS": "0", "LISTEN_PID": str(PID)}, []),
        ({"LISTEN_FDS": "2", "LISTEN_PID": str(PID)}, [ListenFd(3, "unknown"), ListenFd(4, "unknown")]),
        (
            {"LISTEN_FDS": "2", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "webhook:"},
            [ListenFd(3, "webhook"), ListenFd(4, "unknown")],
        ),
    ],
)
def test_listen_fds_start_at_3_for_this_process_only(env: dict[str, str], expected: list[ListenFd]) -> None:
    assert parse_listen_fds(env, PID) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID must be a process id, got 'me'"),
        ({"LISTEN_FDS": "-1", "LISTEN_PID": str(PID)}, "LISTEN_FDS must be a non-negative count, got '-1'"),
        ({"LISTEN_FDS": "two", "LISTEN_PID": str(PID)}, "LISTEN_FDS must be a non-negative count"),
        ({"LISTEN_FDS": "", "LISTEN_PID": str(PID)}, "LISTEN_FDS must be a non-negative count"),
        (
            {"LISTEN_FDS": "1", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES names 2 socket\\(s\\) but LISTEN_FDS is 1",
        ),
    ],
)
def test_malformed_listen_variables_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        parse_listen_fds(env, PID)


def test_the_listen_variables_are_unset_once_read() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "webhook", "PATH": "/bin"}
    activated = ActivatedSockets.from_environment(env, pid=PID)
    assert not activated
    assert env == {"PATH": "/bin"}


def test_a_malformed_environment_is_refused_before_anything_changes() -> None:
    env = {"LISTEN_FDS": "x", "LISTEN_PID": str(PID)}
    with pytest.raises(ActivationError):
        ActivatedSockets.from_environment(env, pid=PID)
    assert env == {"LISTEN_FDS": "x", "LISTEN_PID": str(PID)}  # refused before anything changed


def test_a_listening_tcp_socket_is_adopted_close_on_exec() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        fd = os.dup(server.fileno())
        os.set_inheritable(fd, True)
        adopted = _adopt(ListenFd(fd, "webhook"))
        assert adopted.getsockname() == server.getsockname()
        assert not adopted.get_inheritable()
        adopted.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "must be a TCP socket.*SOCK_DGRAM"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "is not listening"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "must be a TCP socket.*AF_UNIX"),
    ],
)
def test_a_socket_that_cannot_serve_http_is_refused(make: object, message: str) -> None:
    assert callable(make)
    with make() as sock:
        with pytest.raises(ActivationError, match=message):
            _adopt(ListenFd(sock.fileno(), "webhook"))
        assert sock.fileno() >= 0  # refused, not closed: it still belongs to its owner


def test_a_descriptor_that_is_not_a_socket_is_refused() -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(ActivationError, match=rf"fd {read} \(webhook\) is not a socket"):
            _adopt(ListenFd(read, "webhook"))
    finally:
        os.close(read)
        os.close(write)


async def test_each_run_gets_fresh_listeners_on_the_same_port() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    activated = ActivatedSockets([server])
    for _ in range(2):  # a restarted listener actor serves the same socket again
        [listener] = activated.listeners()
        assert listener.socket.getsockname() == address
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _answer, [listener])
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://{address[0]}:{address[1]}/")
            assert response.status_code == 200
            nursery.cancel_scope.cancel()
    assert repr(activated) == f"<ActivatedSockets [{address}]>"
    activated.close()
    assert server.fileno() == -1


async def _answer(stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
