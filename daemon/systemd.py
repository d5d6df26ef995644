"""sd_notify: tell systemd when ferry is ready, what it is doing, and that its loop is alive.

Does nothing when `NOTIFY_SOCKET` is unset (not run by systemd with Type=notify).
"""

from __future__ import annotations

import contextlib
import os
import socket

import trio


class Notifier:
    """Sends sd_notify datagrams to `$NOTIFY_SOCKET` (path or abstract `@name`)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        """Send `KEY=VALUE` lines in one datagram; errors are ignored (systemd may be gone)."""
        if self._sock is None or self._address is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout systemd asked for (`WATCHDOG_USEC`), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    async def keep_alive(self) -> None:
        """Send `WATCHDOG=1` from the event loop until cancelled: a stuck loop stops the pings."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
