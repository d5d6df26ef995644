"""Requests per second from ferry's HTTP clients to a local trio + h11 server.

    .venv/bin/python bench/client_bench.py [--seconds 1.0] [--runs 3]

The server runs in its own process on 127.0.0.1 (so the client's CPU is what is
measured) and answers every POST with a small JSON 200, keeping connections
alive. Each case posts a ~200-byte JSON body from 1 task, then from 8 concurrent
tasks, for `--seconds` per run; the table shows the median of `--runs` runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable

import h11
import httpx
import trio

from daemon.http.client import HttpClient, HttpxClient, LeanClient

BODY = b'{"id":"evt_0001","type":"contact.updated","data":{"email":"a@example.com"}}' + b" " * 120
HEADERS = [("Content-Type", "application/json"), ("Idempotency-Key", "d-0001")]
ANSWER = b'{"ok":true}'

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


async def rate(post: Post, tasks: int, seconds: float) -> float:
    """Requests completed per second by `tasks` tasks posting back to back for `seconds`."""
    done = 0

    async def loop() -> None:
        nonlocal done
        while True:
            assert await post() == 200
            done += 1

    start = trio.current_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(loop)
    return done / (trio.current_time() - start)


def ferry_post(client: HttpClient, url: str) -> Post:
    async def post() -> int:
        return (await client.request("POST", url, headers=HEADERS, body=BODY, timeout=10)).status

    return post


def raw_httpx_post(client: httpx.AsyncClient, url: str) -> Post:
    async def post() -> int:
        response = await client.post(url, headers=HEADERS, content=BODY, timeout=10)
        _ = response.content
        return response.status_code

    return post


async def bench(url: str, seconds: float, runs: int) -> None:
    print(f"{'client':<12} {'1 task req/s':>14} {'8 tasks req/s':>14}   (median of {runs} x {seconds:g}s)")
    for name in ("LeanClient", "HttpxClient", "raw httpx"):
        medians = []
        for tasks in (1, 8):
            raw = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
            client: HttpClient = LeanClient() if name == "LeanClient" else HttpxClient()
            post = raw_httpx_post(raw, url) if name == "raw httpx" else ferry_post(client, url)
            try:
                await rate(post, tasks, min(seconds, 0.2))  # warm up: connections, caches
                medians.append(statistics.median([await rate(post, tasks, seconds) for _ in range(runs)]))
            finally:
                await client.aclose()
                await raw.aclose()
        print(f"{name:<12} {medians[0]:>14,.0f} {medians[1]:>14,.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median shown)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(serve)
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        trio.run(bench, f"http://127.0.0.1:{port}/events", args.seconds, args.runs)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
