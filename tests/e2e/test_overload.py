"""Overload and hostile clients against the real daemon: shed with 503 + Retry-After, never lose a 202.

- A burst far above `[listener] max_pending` gets some 503s with `Retry-After`, every 202'd event
  is in the store, and nothing answered 503 is (the store holds exactly the 202s).
- Slowloris heads, slow bodies and piles of idle connections at `max_connections` do not lock
  out a prompt client, and the daemon's open sockets stay within the limit.
- An oversized head gets 431 and the daemon serves the next client as before.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import final

import httpx
import msgspec
import trio

from tests.chaos import load
from tests.fakes import Daemon, write_config

SOURCE = """
[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


def start(tmp_path: Path, listener: str) -> Daemon:
    config = write_config(tmp_path, SOURCE)
    text = config.read_text(encoding="utf-8").replace("[listener]\n", f"[listener]\n{listener}\n", 1)
    config.write_text(text + "\n[telemetry]\nmetrics = false\n", encoding="utf-8")
    return Daemon(config, tmp_path / "ferry.log").start()


def stored_ids(tmp_path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{tmp_path / 'state/ferry.db'}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM events")]
    finally:
        conn.close()


def open_sockets(pid: int) -> int:
    """Sockets the process holds now (an fd closed while they are listed is not counted)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += "socket" in os.readlink(f"/proc/{pid}/fd/{fd}")
    return count


async def test_a_burst_far_above_max_pending_is_shed_with_503_and_no_202_is_lost(tmp_path: Path) -> None:
    daemon = start(tmp_path, "max_pending = 8")
    host, port = daemon.address.rsplit(":", 1)
    clients, each = 200, 10
    statuses: Counter[int] = Counter()
    acked: list[str] = []
    accepted_latency: list[float] = []
    retry_after: set[bytes] = set()

    async def sender(n: int) -> None:
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            for i in range(each):
                body = msgspec.json.encode({"n": n, "i": i})
                began = time.monotonic()
                status, headers, answer = await load.exchange(stream, load.request(body))
                statuses[status] += 1
                if status == 202:
                    acked.append(msgspec.json.decode(answer)["id"])
                    accepted_latency.append(time.monotonic() - began)
                elif status == 503:
                    retry_after.add(headers.get(b"retry-after", b"missing"))
                    assert msgspec.json.decode(answer)["error"].startswith("overloaded")

    try:
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(sender, n)
    finally:
        daemon.stop()
    assert set(statuses) == {202, 503}, statuses
    assert statuses[503] > 0, statuses
    assert statuses[202] > 0, statuses
    assert retry_after == {b"1"}
    stored = stored_ids(tmp_path)
    assert sorted(stored) == sorted(acked), "the store holds something other than exactly the 202s"
    accepted_latency.sort()
    p99 = accepted_latency[int(len(accepted_latency) * 0.99)]
    print(
        f"\n{clients * each} requests, {clients} at once, max_pending=8: {dict(statuses)}, "
        f"accepted p50 {accepted_latency[len(accepted_latency) // 2] * 1000:.0f} ms p99 {p99 * 1000:.0f} ms"
    )
    assert p99 < 5.0


HANG_GUARD = 20.0
"""Seconds: a guard against a hang, not a speed target. A prompt request that had to wait for a
slow or idle client to finish or time out would wait at least 25 s (the shortest drip) and
normally takes milliseconds."""


@final
class Clients:
    """Slow and idle clients: how many the daemon has closed, how many sent their whole drip."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.closed = 0
        self.finished = 0
        self._changed = trio.Event()

    async def closed_at_least(self, count: int) -> None:
        while self.closed < count:
            await self._changed.wait()
            self._changed = trio.Event()

    async def hold(self, stream: trio.SocketStream, drip: bytes) -> None:
        """Send `drip` one byte per 50 ms until `done`; stop early when the daemon closes the
        connection (counted in `closed`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, stream, nursery.cancel_scope)
            nursery.start_soon(self._drip, stream, drip)
            await self.done.wait()
            nursery.cancel_scope.cancel()

    async def _drip(self, stream: trio.SocketStream, drip: bytes) -> None:
        try:
            for byte in drip:
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.05)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the daemon closed it: _watch counts it
        self.finished += len(drip) > 0

    async def _watch(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while await stream.receive_some():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # reset by the daemon (it closed with our bytes unread)
        self.closed += 1
        self._changed.set()
        scope.cancel()


async def test_slow_and_idle_clients_do_not_lock_out_a_prompt_one(tmp_path: Path) -> None:
    daemon = start(tmp_path, 'max_connections = 16\nheader_timeout = "60s"\nbody_timeout = "60s"')
    assert daemon.proc is not None
    host, port = daemon.address.rsplit(":", 1)
    slow_head = (
        b"POST /hooks/demo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 500
    )
    slow_body = (
        b'POST /hooks/demo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n{"a":"'
    )
    baseline = open_sockets(daemon.proc.pid)
    clients = Clients()
    streams: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:
            for n in range(120):  # 40 each of slowloris heads, slow bodies and idle connections
                stream = await trio.open_tcp_stream(host, int(port))
                streams.append(stream)
                drip = (slow_head, slow_body + b"b" * 900, b"")[n % 3]
                nursery.start_soon(clients.hold, stream, drip)
            # The table is full of slow and idle clients: each one past the 16th made room by
            # closing the longest-waiting one, and the daemon has taken every connection.
            with trio.fail_after(HANG_GUARD):
                await clients.closed_at_least(120 - 16)
            assert open_sockets(daemon.proc.pid) <= baseline + 16 + 1
            async with httpx.AsyncClient(base_url=daemon.url, timeout=HANG_GUARD) as client:
                for n in range(10):
                    response = await client.post("/hooks/demo", json={"prompt": n})
                    assert response.status_code == 202, response.text
                    # Answered while the slow clients still hold their connections, each request
                    # provably incomplete (the shortest drip takes over 25 s): the prompt client was
                    # served beside them, not after them.
                    assert clients.finished == 0
                    assert clients.closed <= 120 - 16 + 1
            assert open_sockets(daemon.proc.pid) <= baseline + 16 + 1
            clients.done.set()
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
        daemon.stop()
    assert len(stored_ids(tmp_path)) == 10, "a half-sent request was stored"


async def test_an_oversized_head_is_431_and_the_next_client_is_served(tmp_path: Path) -> None:
    daemon = start(tmp_path, 'max_header = "4KiB"')
    try:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=5) as client:
            big = await client.post("/hooks/demo", json={}, headers={"X-Big": "x" * 8000})
            many = await client.post("/hooks/demo", json={}, headers={f"X-{n}": "y" * 40 for n in range(200)})
            fine = await client.post("/hooks/demo", json={"ok": True})
    finally:
        daemon.stop()
    for response in (big, many):
        assert response.status_code == 431
        assert response.json() == {"error": "request head larger than 4096 bytes"}
    assert fine.status_code == 202
