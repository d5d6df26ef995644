"""Case 5: webhook → sink latency under a steady, open-loop 500 events/s.

The load generator runs in this process: trio, h11 over keep-alive TCP connections. A
scheduler releases event n at `start + n / rate` whatever happened to earlier ones (open
loop); a free connection posts it with `{"id": n, "sent": time.time()}` taken just before
the write. The daemon's transform is `.` (so `sent` survives) and its sink sends each event
on its own. The receiver, in latency mode, records `receive time - sent` for every event.
How late the generator itself was against its schedule is reported alongside, so a slow
generator cannot pass for a slow daemon.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import h11
import trio

from bench.context import Context
from bench.harness import SOURCE, Ferry, write_config
from bench.report import Row

RATE = 500
CONNECTIONS = 64  # enough that the generator never waits for a free one at 500/s
P99_TARGET_MS = 50.0


@dataclass
class Load:
    """What the generator did."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lags: list[float] = field(default_factory=list)  # seconds behind schedule at each send
    seconds: float = 0.0


async def _connection(
    address: str,
    jobs: trio.MemoryReceiveChannel[tuple[int, float]],
    load: Load,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    task_status.started()
    async with stream, jobs:
        async for n, due in jobs:
            load.lags.append(trio.current_time() - due)
            body = b'{"id": %d, "sent": %.6f}' % (n, time.time())
            headers = [
                ("host", address),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ]
            request = h11.Request(method="POST", target=f"/hooks/{SOURCE}", headers=headers)
            await stream.send_all(
                conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
            load.sent += 1
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    load.statuses[event.status_code] += 1
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise RuntimeError("the daemon closed a keep-alive connection")
            conn.start_next_cycle()


async def open_loop(address: str, rate: int, seconds: float) -> Load:
    """Post `rate` x `seconds` events at `rate`/s over `CONNECTIONS` keep-alive connections."""
    total = int(rate * seconds)
    load = Load()
    send, receive = trio.open_memory_channel[tuple[int, float]](total)
    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:
            async with receive:
                for _ in range(CONNECTIONS):
                    await nursery.start(_connection, address, receive.clone(), load)
            start = trio.current_time()
            async with send:
                for n in range(total):
                    due = start + n / rate
                    await trio.sleep_until(due)
                    send.send_nowait((n, due))
        load.seconds = trio.current_time() - start
    return load


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def latency(ctx: Context) -> None:
    seconds = 3.0 if ctx.quick else 10.0
    folder = ctx.tmp / "latency"
    config = write_config(folder, ctx.receiver.url + "/event", batch=False, concurrency=16, map_=".")
    ferry = Ferry.start(folder, config, ctx.running)
    await ctx.receiver.reset(latency=True)
    load = await open_loop(ferry.address, RATE, seconds)
    await ctx.receiver.wait_items(load.sent, 30)
    await trio.sleep(0.3)
    stats = await ctx.receiver.stats()
    samples = await ctx.receiver.latencies()
    states = ferry.counts()
    peak = ctx.rss_row(f"latency at {RATE}/s", ferry)
    ferry.stop()
    ms = [s * 1000 for s in samples]
    p50 = percentile(ms, 50) if ms else None
    p99 = percentile(ms, 99) if ms else None
    ok = load.statuses.get(202, 0) == load.sent and stats["items"] == load.sent
    ctx.details["latency"] = {
        "rate": RATE,
        "seconds": seconds,
        "sent": load.sent,
        "achieved_rate": load.sent / load.seconds if load.seconds else None,
        "statuses": dict(load.statuses),
        "generator_lag_ms": {
            "p50": percentile(load.lags, 50) * 1000 if load.lags else None,
            "p99": percentile(load.lags, 99) * 1000 if load.lags else None,
            "max": max(load.lags) * 1000 if load.lags else None,
        },
        "received": stats["items"],
        "latency_ms": {
            "p50": p50,
            "p90": percentile(ms, 90) if ms else None,
            "p99": p99,
            "max": max(ms) if ms else None,
            "mean": statistics.fmean(ms) if ms else None,
        },
        "deliveries": states,
        "peak_rss_mib": peak,
    }
    if not ok:
        ctx.anomalies.append(
            f"latency: sent {load.sent}, statuses {dict(load.statuses)}, received {stats['items']}"
        )
    ctx.rows += [
        Row(f"webhook -> sink latency p50 at {RATE} events/s", p50, "ms"),
        Row(
            f"webhook -> sink latency p99 at {RATE} events/s",
            p99,
            "ms",
            target=f"<= {P99_TARGET_MS:g} ms",
            passed=p99 is not None and p99 <= P99_TARGET_MS and ok,
        ),
    ]
