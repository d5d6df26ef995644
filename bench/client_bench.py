"""CPU per request of ferry's HTTP clients, and of httpcore, against a local trio + h11 server.

    .venv/bin/python -m bench.client_bench [--seconds 1.0] [--runs 5]

The server runs in its own process on 127.0.0.1 (so this process's CPU is the client's) and
answers every POST with a small JSON 200, keeping connections alive. Each client posts a
~200-byte JSON body with the sink's headers (content type, idempotency key, traceparent) from
1 task, then from 16 concurrent tasks, for `--seconds` per run. The runs go round-robin over
the clients (run 1 of every client, then run 2, ...) so that a busy spell on the shared machine
hits them all alike; each figure is the median of `--runs` runs:

- **CPU µs/request**: this process's CPU time (`time.process_time`, every thread) over the run,
  divided by the requests completed — what the machine's load hardly moves;
- **req/s**: requests completed per second of wall time — what the load moves a lot.

Clients: `httpx` (`HttpxClient`, ferry's wrapper of `httpx.AsyncClient`: the baseline),
`httpcore` (`httpcore.AsyncConnectionPool` directly, httpx's own lower layer, streamed the same
way), `lean` (`LeanClient`: h11 over trio streams, the sinks' default). Ratios are the
client's CPU per request over the baseline's in the same run (0.5x: half httpx's CPU), and
"less CPU" its inverse.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import httpcore
import trio

from daemon.http.client import HttpClient, HttpxClient, LeanClient

BODY = b'{"id":"evt_0001","type":"contact.updated","data":{"email":"a@example.com"}}' + b" " * 120
HEADERS = [
    ("content-type", "application/json"),
    ("Idempotency-Key", "1a213a2391be2c83bf41beb94a0.shape.crm"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]
ANSWER = b'{"ok":true}'
TASKS = (1, 16)
BASELINE = "httpx"

Post = Callable[[], Awaitable[int]]


async def serve_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.EndOfMessage):
                head = h11.Response(
                    status_code=200,
                    headers=[("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))],
                )
                await stream.send_all(
                    (conn.send(head) or b"") + (conn.send(h11.Data(data=ANSWER)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )  # fmt: skip
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return


async def serve() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve_connection, listeners)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # until the parent goes
        nursery.cancel_scope.cancel()


async def measure(post: Post, tasks: int, seconds: float) -> tuple[float, float]:
    """(requests/s, CPU µs per request) of `tasks` tasks posting back to back for `seconds`."""
    done = 0

    async def loop() -> None:
        nonlocal done
        while True:
            assert await post() == 200
            done += 1

    start, cpu = trio.current_time(), time.process_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(loop)
    cpu, wall = time.process_time() - cpu, trio.current_time() - start
    return done / wall, cpu / max(done, 1) * 1e6


def ferry_post(client: HttpClient, url: str) -> Post:
    async def post() -> int:
        return (await client.request("POST", url, headers=HEADERS, body=BODY, timeout=10)).status

    return post


class HttpcoreClient:
    """httpcore's connection pool behind ferry's `request` shape (streamed, body kept to 64 KiB)."""

    def __init__(self, max_connections: int = 32) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )

    async def request(
        self, method: str, url: str, *, headers: list[tuple[str, str]], body: bytes, timeout: float
    ) -> object:
        limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        with trio.fail_after(timeout):
            async with self._pool.stream(
                method, url, headers=headers, content=body, extensions={"timeout": limits}
            ) as response:
                chunks, kept = [], 0
                async for chunk in response.aiter_stream():
                    if kept < 65536:
                        chunks.append(chunk)
                        kept += len(chunk)
                return _Answer(response.status, b"".join(chunks)[:65536])

    async def aclose(self) -> None:
        await self._pool.aclose()


@dataclass
class _Answer:
    status: int
    body: bytes


class H11Client:
    """The lean client as it was until session 5: h11's state machine over trio streams, pooled.

    Kept here, happy path only, as the reference for what dropping h11 saved.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[tuple[trio.abc.Stream, h11.Connection]]] = {}

    async def request(
        self, method: str, url: str, *, headers: list[tuple[str, str]], body: bytes, timeout: float
    ) -> object:
        parts = urlsplit(url)
        key = (parts.hostname or "", parts.port or 80)
        fields = [("Host", parts.netloc), *headers, ("User-Agent", "ferry/0.1")]
        fields.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=parts.path or "/", headers=fields)
        with trio.fail_after(timeout):
            pool = self._idle.setdefault(key, [])
            if pool:
                stream, conn = pool.pop()
            else:
                stream, conn = await trio.open_tcp_stream(*key), h11.Connection(h11.CLIENT)
            data = (conn.send(request) or b"") + (conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif type(event) is h11.Response:
                    status = event.status_code
                    _ = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
                elif type(event) is h11.Data:
                    chunks.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    break
            conn.start_next_cycle()
            pool.append((stream, conn))
            return _Answer(status, b"".join(chunks))

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for stream, _ in pool:
                await trio.aclose_forcefully(stream)


CLIENTS: dict[str, Callable[[], HttpClient]] = {
    "httpx": HttpxClient,
    "httpcore": HttpcoreClient,  # type: ignore[dict-item]  # the same request/aclose shape
    "h11": H11Client,  # type: ignore[dict-item]
    "lean": LeanClient,
}
NAMES = {"httpx": "HttpxClient", "httpcore": "httpcore", "h11": "h11 path", "lean": "LeanClient"}


@dataclass
class Figure:
    client: str
    tasks: int
    rate: float  # req/s, median
    cpu_us: float  # CPU µs per request, median
    baseline_us: float | None  # the baseline's cpu_us in the same run
    ratio: float | None  # cpu_us / baseline_us: 0.5x is half httpx's CPU per request


async def bench(url: str, seconds: float, runs: int, clients: list[str]) -> list[Figure]:
    """Every client at every concurrency of `TASKS`, round-robin over `runs` runs (module doc)."""
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    opened = {name: CLIENTS[name]() for name in clients}
    try:
        posts = {name: ferry_post(client, url) for name, client in opened.items()}
        for post in posts.values():  # warm up: connections, caches
            for tasks in TASKS:
                await measure(post, tasks, min(seconds, 0.2))
        for _ in range(runs):
            for tasks in TASKS:
                for name, post in posts.items():
                    samples.setdefault((name, tasks), []).append(await measure(post, tasks, seconds))
    finally:
        for client in opened.values():
            await client.aclose()
    figures = []
    for (name, tasks), runs_seen in samples.items():
        cpu = statistics.median(s[1] for s in runs_seen)
        base = samples.get((BASELINE, tasks))
        base_cpu = statistics.median(s[1] for s in base) if base else None
        ratio = cpu / base_cpu if base_cpu else None
        figures.append(Figure(name, tasks, statistics.median(s[0] for s in runs_seen), cpu, base_cpu, ratio))
    return sorted(figures, key=lambda f: (f.tasks, clients.index(f.client)))


def table(figures: list[Figure], runs: int, seconds: float) -> str:
    lines = [
        f"{'client':<10} {'tasks':>5} {'CPU µs/req':>11} {'x httpx':>8} {'less CPU':>9} {'req/s':>9}"
        f"   (medians of {runs} x {seconds:g}s, round-robin)"
    ]
    for f in figures:
        ratio = f"{f.ratio:.2f}x" if f.ratio else "-"
        less = f"{1 / f.ratio:.2f}x" if f.ratio else "-"
        lines.append(f"{f.client:<10} {f.tasks:>5} {f.cpu_us:>11.1f} {ratio:>8} {less:>9} {f.rate:>9,.0f}")
    return "\n".join(lines)


class Server:
    """The trio + h11 server of this module in its own process (`--serve`), until `close()`."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.client_bench", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self._process.stdout.readline())}/events"

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median shown)")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated: " + ", ".join(CLIENTS))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(serve)
        return 0
    server = Server()
    try:
        figures = trio.run(bench, server.url, args.seconds, args.runs, args.clients.split(","))
    finally:
        server.close()
    print(table(figures, args.runs, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
