"""systemd integration: sd_notify (readiness, status, watchdog, reload, stop) and socket activation.

Everything here does nothing when systemd did not ask for it: without `NOTIFY_SOCKET`
the `Notifier` sends nothing, without `LISTEN_FDS` there are no activated sockets. No
libsystemd is needed; the protocols are a datagram of `KEY=VALUE` lines and a few
environment variables (sd_notify(3), sd_listen_fds(3)).

Notifications, in the order systemd sees them:

    READY=1 + STATUS=...       every actor has started and the listener is accepting
    STATUS=...                 a one-line summary, every `STATUS_INTERVAL` seconds
    WATCHDOG=1                 every half `WATCHDOG_USEC`, sent from the trio event loop
    RELOADING=1 + MONOTONIC_USEC=...  then READY=1     around a reload (`reloading()` / `reloaded()`)
    STOPPING=1                 SIGTERM received; intake stops, then the shutdown grace runs

Error handling: a notification that cannot be sent (systemd gone, socket buffer full) is
dropped silently and never blocks the event loop: the socket is non-blocking. A socket-
activation environment that is malformed or names unusable file descriptors raises
`ActivationError` at startup: a daemon that silently ignored the sockets it was given
would leave connections hanging in the socket unit's backlog.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Final, NamedTuple, final

import trio

from daemon.errors import ActivationError

__all__ = [
    "LISTEN_FDS_START",
    "STATUS_INTERVAL",
    "ActivatedSockets",
    "ActivationError",
    "Notifier",
    "parse_listen_fds",
    "watchdog_interval",
]

LISTEN_FDS_START: Final = 3
"""The first file descriptor systemd passes (`SD_LISTEN_FDS_START`)."""

STATUS_INTERVAL: Final = 10.0
"""Seconds between two `STATUS=` updates."""

_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between `WATCHDOG=1` pings: half `WATCHDOG_USEC`, or None when no watchdog is asked of `pid`.

    `WATCHDOG_PID`, when set, names the process the watchdog is for; another process
    (a child that inherited the environment) must not ping.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6


def _notify_address(address: str | None) -> str | None:
    """`NOTIFY_SOCKET` as a `sendto` address: a path, or `@name` for the abstract namespace."""
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None  # sd_notify accepts nothing else (vsock addresses are not supported here)


@final
class Notifier:
    """Sends sd_notify datagrams to `NOTIFY_SOCKET` (a path or an abstract `@name`).

    Build one per process, before `serve` starts actors; `enabled` is False when systemd
    did not ask for notifications, and then every method does nothing.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        self._address = _notify_address(env.get("NOTIFY_SOCKET"))
        self._interval = watchdog_interval(env, pid)
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    def __repr__(self) -> str:
        if self._address is None:
            return "<Notifier disabled>"
        watchdog = f"watchdog every {self._interval:g}s" if self._interval else "no watchdog"
        return f"<Notifier {self._address.replace(chr(0), '@')!r} [{watchdog}]>"

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings, or None when systemd runs no watchdog for us."""
        return self._interval if self.enabled else None

    def notify(self, *lines: str) -> None:
        """Send `KEY=VALUE` lines in one datagram; a failure to send is ignored (systemd may be gone)."""
        if self._sock is None or self._address is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str | None = None) -> None:
        """`READY=1`: every actor has started. Send it once, after the listener accepts connections."""
        self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> None:
        """`STATUS=`: the line `systemctl status ferry` shows."""
        self.notify(f"STATUS={_one_line(text)}")

    def reloading(self) -> None:
        """`RELOADING=1` with `MONOTONIC_USEC`: a reload has begun (SIGHUP or `ferry ctl reload`).

        For the reload implementer: call this first thing when the reload starts, apply the
        new config, then call `reloaded()` whether it was applied or refused. systemd 253+
        needs `MONOTONIC_USEC` to tell this reload from an earlier one (`Type=notify-reload`);
        older ones ignore it. `systemctl reload` returns once `READY=1` arrives.
        """
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self, status: str | None = None) -> None:
        """`READY=1` again: the reload is over (applied or refused; say which in `status`)."""
        self.ready(status)

    def stopping(self, status: str | None = None) -> None:
        """`STOPPING=1`: shutdown has begun; intake is closing and in-flight work gets its grace."""
        self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    async def keep_alive(self) -> None:
        """Send `WATCHDOG=1` from the event loop until cancelled, so a stuck loop stops the pings.

        Runs in the outer nursery: it keeps pinging through the shutdown grace.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def report_status(
        self, summary: Callable[[], Awaitable[str]], interval: float = STATUS_INTERVAL
    ) -> None:
        """Send `STATUS=<await summary()>` now and then every `interval` seconds until cancelled.

        `summary` should be cheap (counters, an indexed count); an exception from it
        propagates, as a bug in it should.
        """
        if not self.enabled:
            return
        while True:
            self.status(await summary())
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ListenFd(NamedTuple):
    """One file descriptor systemd passed, with its `FileDescriptorName=` ("unknown" if unnamed)."""

    fd: int
    name: str


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The file descriptors passed to `pid` by socket activation (sd_listen_fds(3) semantics).

    No `LISTEN_FDS` or `LISTEN_PID`, or a `LISTEN_PID` naming another process (the
    variables were inherited): no descriptors. Values that are not numbers, a negative
    count, or a `LISTEN_FDNAMES` whose count differs: `ActivationError`.
    """
    count, owner = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    if count is None or owner is None:
        return []
    if not owner.isdigit():
        raise ActivationError(f"LISTEN_PID must be a process id, got {owner!r}")
    if int(owner) != pid:
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS must be a non-negative count, got {count!r}")
    n = int(count)
    names_var = environ.get("LISTEN_FDNAMES")
    names = names_var.split(":") if names_var is not None else ["unknown"] * n
    if len(names) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} socket(s) but LISTEN_FDS is {n}")
    return [ListenFd(LISTEN_FDS_START + i, name or "unknown") for i, name in enumerate(names)]


def _adopt(passed: ListenFd) -> socket.socket:
    """The listening TCP socket at `passed.fd`, close-on-exec; `ActivationError` for anything else."""
    try:
        sock = socket.socket(fileno=passed.fd)
    except OSError as exc:
        raise ActivationError(f"fd {passed.fd} ({passed.name}) is not a socket: {exc.strerror}") from exc
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            f"fd {passed.fd} ({passed.name}) must be a TCP socket (ListenStream=host:port), "
            f"got {sock.family.name}/{sock.type.name}"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {passed.fd} ({passed.name}) is not listening")
    sock.set_inheritable(False)
    return sock


@final
class ActivatedSockets:
    """The listening sockets systemd passed (`ferry.socket`), held for the process's lifetime.

    `listeners()` wraps duplicates of them, so each incarnation of the webhook listener
    (a restart after a crash closes its listeners) serves the same ports.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
    ) -> ActivatedSockets:
        """Adopt the sockets `LISTEN_FDS` describes and unset `LISTEN_*` (children must not see them)."""
        env = os.environ if environ is None else environ
        passed = parse_listen_fds(env, os.getpid() if pid is None else pid)
        for name in _LISTEN_VARS:
            env.pop(name, None)
        adopted: list[socket.socket] = []
        try:
            for item in passed:
                adopted.append(_adopt(item))
        except ActivationError:
            for sock in adopted:
                sock.close()
            raise
        return cls(adopted)

    def __bool__(self) -> bool:
        return bool(self._sockets)

    def __repr__(self) -> str:
        return f"<ActivatedSockets {[sock.getsockname()[:2] for sock in self._sockets]}>"

    def listeners(self) -> list[trio.SocketListener]:
        """Fresh trio listeners on duplicates of the sockets (closing them leaves the originals open)."""
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup())) for sock in self._sockets]

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
