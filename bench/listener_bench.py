"""Webhook listener throughput against a bare trio + h11 server, both driven by `wrk`.

Run: `.venv/bin/python bench/listener_bench.py [--duration 5] [--connections 50] [--rounds 2]`.

Each server runs in this process on 127.0.0.1 (one core, as in production) while `wrk`
POSTs a small JSON body over keep-alive connections. The bare server answers 202 to
every request and does nothing else: it is the ceiling for h11 on trio. The listener runs
with a no-op ingest, so the ratio is the cost of ferry's HTTP handling (routing, limits,
timeouts, JSON validation). Rounds alternate between the two; the best of each is kept.
Bounded in time: about 2 x rounds x duration seconds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import h11
import trio
from opentelemetry.trace import Span

from actors.webhook.config import ListenerConfig
from actors.webhook.listener import IngestResult, WebhookListener, WebhookRoute

PATH = "/hooks/bench"
BODY = '{"id": 1, "first": "Ada", "last": "Lovelace", "email": "ada@example.com"}'
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.path = "{PATH}"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


async def bare_handler(stream: trio.SocketStream) -> None:
    """The ceiling: h11 on a trio stream, 202 to every request, no other work."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif type(event) is h11.EndOfMessage:
                headers = [(b"content-type", b"application/json"), (b"content-length", b"13")]
                await stream.send_all(
                    conn.send(h11.Response(status_code=202, headers=headers))
                    + conn.send(h11.Data(data=b'{"id": "evt"}'))
                    + conn.send(h11.EndOfMessage())
                )
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed:
                return
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_bare(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, bare_handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def noop_ingest(
    source: str,
    body: bytes,
    dedup_key: str | None,
    traceparent: str | None,
    replay: tuple[str, float] | None = None,
    *,
    parent: Span | None = None,
) -> IngestResult:
    return "evt", False


async def serve_listener(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listener = WebhookListener(
        ListenerConfig(address="127.0.0.1:0"),
        {PATH: WebhookRoute("bench", "Idempotency-Key")},
        noop_ingest,
        lambda: True,
    )
    async with trio.open_nursery() as nursery:
        [(_, port)] = await nursery.start(listener.run)
        task_status.started(port)


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run reported."""

    rps: float
    requests: int
    non_2xx: int
    socket_errors: str | None
    output: str


async def run_wrk(url: str, script: Path, *, threads: int, connections: int, duration: float) -> WrkResult:
    """Run wrk against `url` with the Lua `script`; bounded to `duration` + 30 s."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "-s", str(script), url]
    with trio.fail_after(duration + 30):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    return parse_wrk(result.stdout.decode() + result.stderr.decode())


def parse_wrk(output: str) -> WrkResult:
    """The figures of wrk's summary."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    if rps is None or requests is None:
        raise SystemExit(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:\s*(.*)", output)
    return WrkResult(
        float(rps.group(1)),
        int(requests.group(1)),
        int(non_2xx.group(1)) if non_2xx else 0,
        errors.group(1).strip() if errors else None,
        output,
    )


async def measure(server: Callable[..., Awaitable[None]], script: Path, args: argparse.Namespace) -> float:
    """Requests/s that wrk reached against `server`."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server)
        result = await run_wrk(
            f"http://127.0.0.1:{port}{PATH}",
            script,
            threads=args.threads,
            connections=args.connections,
            duration=args.duration,
        )
        nursery.cancel_scope.cancel()
    if result.non_2xx or result.socket_errors:
        raise SystemExit(f"wrk saw errors:\n{result.output}")
    return result.rps


async def main(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk); nothing measured", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "post.lua"
        script.write_text(WRK_SCRIPT)
        bare: list[float] = []
        ours: list[float] = []
        for round_ in range(1, args.rounds + 1):
            bare.append(await measure(serve_bare, script, args))
            ours.append(await measure(serve_listener, script, args))
            print(
                f"round {round_}: bare h11 {bare[-1]:>8.0f} req/s   webhook listener {ours[-1]:>8.0f} req/s"
            )
    print(f"best:    bare h11 {max(bare):>8.0f} req/s   webhook listener {max(ours):>8.0f} req/s")
    print(f"ratio: {max(ours) / max(bare):.2f} (target >= 0.75)")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=1, help="wrk threads (the server needs the other core)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
