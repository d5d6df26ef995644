"""A fast fake sink receiver for the benchmarks: its own process, trio + h11, 200 to every POST.

    .venv/bin/python -m bench.receiver      # prints its port, serves until stdin closes

It counts the JSON items of each request body (an array counts its length, anything else
counts 1), the time of the first and the last delivery, and the distinct idempotency keys
(a key seen twice is a re-sent request). In latency mode it also keeps, for every item,
`receive time - item["sent"]`. Control, all `GET`:

- `/stats`: the counters as JSON;
- `/reset` (`/reset?latency=1` for latency mode): zero everything;
- `/latencies`: the recorded latencies in seconds, as a JSON array.

`Receiver` (below) starts and stops it from the benchmark process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import msgspec
import trio

ROOT = Path(__file__).resolve().parent.parent
_encode = msgspec.json.Encoder().encode
_count_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_OK = b'{"ok":true}'


@dataclass
class State:
    latency_mode: bool = False
    requests: int = 0
    items: int = 0
    first: float | None = None
    last: float | None = None
    keys: set[bytes] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)

    def record(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        now = time.time()
        self.requests += 1
        for name, value in headers:
            if name == b"idempotency-key":
                self.keys.add(value)
        if self.latency_mode:
            decoded = msgspec.json.decode(body)
            items = decoded if isinstance(decoded, list) else [decoded]
            self.latencies.extend(now - float(item["sent"]) for item in items)
            count = len(items)
        else:
            count = len(_count_decoder.decode(body)) if body.lstrip()[:1] == b"[" else 1
        self.items += count
        if self.first is None:
            self.first = now
        self.last = now

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "items": self.items,
            "first": self.first,
            "last": self.last,
            "distinct_keys": len(self.keys),
            "latency_mode": self.latency_mode,
        }


STATE = State()


def control(target: bytes) -> bytes:
    global STATE
    path, _, query = target.partition(b"?")
    if path == b"/reset":
        STATE = State(latency_mode=b"latency=1" in query)
        return _OK
    if path == b"/latencies":
        return _encode(STATE.latencies)
    return _encode(STATE.stats())


async def serve_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    request: h11.Request | None = None
    body: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
            elif isinstance(event, h11.Request):
                request, body = event, []
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                if request.method == b"GET":
                    answer = control(request.target)
                else:
                    STATE.record(list(request.headers), b"".join(body))
                    answer = _OK
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=headers))
                    + conn.send(h11.Data(data=answer))
                    + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
    print(listeners[0].socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve_connection, listeners)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # until the parent goes
        nursery.cancel_scope.cancel()


class Receiver:
    """The receiver as a child process, with async accessors for its control endpoints."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"
        self._client = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def _get(self, path: str) -> Any:
        response = await self._client.get(path)
        response.raise_for_status()
        return response.json()

    async def reset(self, *, latency: bool = False) -> None:
        await self._get("/reset?latency=1" if latency else "/reset")

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._get("/stats")
        return result

    async def latencies(self) -> list[float]:
        result: list[float] = await self._get("/latencies")
        return result

    async def wait_items(self, count: int, timeout: float) -> dict[str, Any]:
        """Poll until `count` items have arrived or `timeout` passes; return the last stats."""
        with trio.move_on_after(timeout):
            while (stats := await self.stats())["items"] < count:
                await trio.sleep(0.02)
            return stats
        return await self.stats()

    async def aclose(self) -> None:
        await self._client.aclose()
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":
    trio.run(serve)
