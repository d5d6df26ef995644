"""Cross-node wake-ups, the ear: each node LISTENs for the other nodes' commits.

`WakeListener` holds one more connection to the shared database that `LISTEN`s on
`daemon.store.postgres.wake.CHANNEL` and fires the named consumers' signals on this node, so work
another node committed is picked up within a round trip and `COALESCE` seconds instead of at the
next heartbeat.

Guarantees:
    None beyond latency. A notification can be missed (the listening connection was down, the
    server restarted); correctness never rests on one: every heartbeat still wakes every
    consumer (`daemon.cluster.control`), and a listener that (re)connects wakes them all once,
    since it cannot know what it missed.

Cost:
    A node hears every other node's notifications; the listener thread gathers those arriving
    within `COALESCE` seconds and hands the trio loop one wake-up for them all, so a busy
    cluster costs each node at most 1/`COALESCE` wake-ups a second.

Outages:
    A lost connection is logged once, then re-opened with backoff (0.1 s doubling to
    `MAX_BACKOFF`); TCP keepalives (`connect`) notice a server that vanished without a word.

Cancellation:
    `run` is cancelled with the daemon; the thread notices within `POLL` seconds (a bounded,
    shielded wait) and closes its connection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, final

import psycopg
import trio

from daemon.errors import StoreUnavailable
from daemon.store.postgres.connect import MAX_BACKOFF, connect, describe
from daemon.store.postgres.wake import CHANNEL, parse

log = logging.getLogger("ferry.store")

COALESCE = 0.02
"""Seconds the listener gathers notifications before it wakes the loop once for all of them."""
POLL = 0.5
"""Longest the listener thread waits on the socket before it looks whether it should stop."""

Wake = Callable[[frozenset[str] | None], None]
"""Called on the trio loop with the consumers to wake (None: all of them)."""


@final
class WakeListener:
    """`await nursery.start(listener.run)`: LISTENs for other nodes' commits; see the module docstring."""

    def __init__(self, url: str, *, node: str, wake: Wake) -> None:
        self._url, self._node, self._wake = url, node, wake
        self._stop = threading.Event()
        self.heard = 0
        """Notifications from other nodes heard so far."""
        self.connected = False
        self.connections = 0
        """Times the listening connection was opened (more than 1: it was lost and re-opened)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        self._stop.clear()

        def thread() -> None:
            try:
                self._listen(token)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        threading.Thread(target=thread, name="ferry-wake-listener", daemon=True).start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._stop.set()
            with trio.CancelScope(shield=True), trio.move_on_after(POLL + 1):
                await done.wait()

    # -- the listener thread -------------------------------------------------------------------

    def _listen(self, token: trio.lowlevel.TrioToken) -> None:
        delay = 0.0
        failing = False
        while not self._stop.is_set():
            try:
                conn = connect(self._url, node=f"{self._node} wake")
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("wake listener cannot connect", extra={"fields": {"error": str(exc)}})
                failing = True
                delay = min(max(delay * 2, 0.1), MAX_BACKOFF)
                self._stop.wait(delay)
                continue
            try:
                conn.autocommit = True
                conn.execute(f"LISTEN {CHANNEL}")
                self.connected, failing, delay = True, False, 0.0
                self.connections += 1
                self._hand(token, None)  # what was missed while not listening is unknown: wake all
                self._drain(conn, token)
            except psycopg.Error as exc:
                log.warning(
                    "wake listener lost its connection",
                    extra={"fields": {"database": describe(self._url), "error": str(exc).strip()}},
                )
                failing = True
            finally:
                self.connected = False
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _drain(self, conn: psycopg.Connection[Any], token: trio.lowlevel.TrioToken) -> None:
        """Until stopped: wait for a notification, gather those of the next `COALESCE` s, hand them on."""
        node = self._node
        while not self._stop.is_set():
            first = list(conn.notifies(timeout=POLL, stop_after=1))
            if not first:
                continue
            self._stop.wait(COALESCE)
            notes = first + list(conn.notifies(timeout=0))
            names: set[str] = set()
            everyone = False
            for note in notes:
                named = parse(note.payload, node)
                if named is None:
                    everyone = True
                elif named:
                    self.heard += 1
                    names |= named
            if everyone:
                self.heard += 1
                self._hand(token, None)
            elif names:
                self._hand(token, frozenset(names))

    def _hand(self, token: trio.lowlevel.TrioToken, names: frozenset[str] | None) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._wake, names)


__all__ = ["WakeListener"]
