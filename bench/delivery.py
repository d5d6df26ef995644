"""Cases 3 and 4: per-event delivery end to end, and draining a stored backlog after a restart.

Per-event: wrk posts about N events as fast as the daemon takes them; the sink (no
batching, concurrency 16) delivers each in its own request; the rate is the receiver's,
from its first delivery to its last. The bare client ceilings (`client_bench`) against the
same receiver say how much of that is the HTTP client itself.

Backlog: the daemon first runs with its sink pointed at a socket that accepts connections
and never answers (so nothing is delivered and nothing is scheduled for retry), takes N
events, and is stopped with SIGTERM once the transform has caught up. It is restarted with
a batching sink pointed at the receiver: READY → last delivery is the drain.

Alone (cases 3 and 4, with the client ceilings):

    .venv/bin/python -m bench.delivery [--quick] [--per-event-only]
"""

from __future__ import annotations

import argparse
import socket
import sys

import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry, post_count, write_config, wrk_missing
from bench.report import Row
from daemon.store.schema import PENDING

PER_EVENT_TARGET = 1500.0
DRAIN_TARGET = 20_000.0
CONCURRENCY = 16


async def client_ceilings(ctx: Context) -> dict[str, float]:
    """CPU per request and requests/s of the HTTP clients posting to the receiver, nothing in between.

    `bench.client_bench.bench`: httpx (the baseline), httpcore, the h11 path and `LeanClient`,
    1 and 16 tasks, round-robin; rows give each client's CPU per request against httpx's.
    Returns the requests/s by case, e.g. `"LeanClient, 16 tasks"` (case 3's baseline).
    """
    from bench.client_bench import BASELINE, NAMES, bench

    seconds, runs = (0.3, 3) if ctx.quick else (1.0, 5)
    figures = await bench(ctx.receiver.url + "/ceiling", seconds, runs, list(NAMES))
    results: dict[str, float] = {}
    for figure in figures:
        tasks = f"{figure.tasks} task" + ("s" if figure.tasks > 1 else "")
        results[f"{NAMES[figure.client]}, {tasks}"] = figure.rate
        ctx.rows.append(
            Row(
                f"HTTP client CPU per request: {figure.client}, {tasks} ({figure.rate:,.0f} req/s)",
                figure.cpu_us,
                "us",
                figure.baseline_us if figure.client != BASELINE else None,
                figure.ratio if figure.client != BASELINE else None,
            )
        )
    return results


async def per_event_delivery(ctx: Context, ceilings: dict[str, float]) -> None:
    count = 3000 if ctx.quick else 20_000
    folder = ctx.tmp / "per_event"
    config = write_config(folder, ctx.receiver.url + "/event", batch=False, concurrency=CONCURRENCY)
    ferry = Ferry.start(folder, config, ctx.running)
    await ctx.receiver.reset()
    cpu_before = ferry.cpu_seconds()
    load = await post_count(ferry.url, folder, count, limit_s=60)
    await trio.sleep(0.2)
    accepted = ferry.accepted()
    await ctx.receiver.wait_items(accepted, max(20.0, accepted / 400))
    cpu = ferry.cpu_seconds() - cpu_before  # ingest, transform and delivery of every event
    await trio.sleep(0.3)
    stats = await ctx.receiver.stats()
    states = ferry.counts()
    peak = ctx.rss_row("per-event delivery", ferry)
    ferry.stop()
    span = (stats["last"] or 0.0) - (stats["first"] or 0.0)
    value = (stats["items"] - 1) / span if span > 0 else None
    resent = stats["requests"] - stats["distinct_keys"]
    exact = stats["items"] == accepted and resent == 0 and states["dead"] == 0
    ctx.details["per_event_delivery"] = {
        "wrk_requests": load.requests,
        "non_2xx": load.non_2xx,
        "socket_errors": load.socket_errors,
        "accepted": accepted,
        "received": stats["items"],
        "requests_resent": resent,
        "first_to_last_s": span,
        "daemon_cpu_s": cpu,
        "deliveries": states,
        "peak_rss_mib": peak,
        "errors_logged": ferry.errors_logged()[:20],
    }
    if not exact:
        ctx.anomalies.append(
            f"per-event delivery: stored {accepted}, received {stats['items']}, re-sent {resent}, {states}"
        )
    ceiling = ceilings.get(f"LeanClient, {CONCURRENCY} tasks")
    ctx.rows.extend(
        (
            Row(
                f"per-event delivery, concurrency {CONCURRENCY}, {accepted:,} events",
                value,
                "events/s",
                ceiling,
                value / ceiling if value and ceiling else None,
                f">= {PER_EVENT_TARGET:,.0f} events/s",
                value is not None and value >= PER_EVENT_TARGET and exact,
                baseline_unit="req/s",
            ),
            Row(
                "  daemon CPU per delivered event (ingest + transform + delivery)",
                cpu / stats["items"] * 1e6 if stats["items"] else None,
                "us",
            ),
        )
    )


async def backlog_drain(ctx: Context) -> None:
    count = 10_000 if ctx.quick else 100_000
    folder = ctx.tmp / "backlog"
    with socket.socket() as hole:  # accepts (in the kernel's backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/hole"
        fill = Ferry.start(
            folder, write_config(folder, url, batch=False, concurrency=1, timeout="1h"), ctx.running
        )
        load = await post_count(fill.url, folder, count, limit_s=90)
        with trio.move_on_after(60):
            while fill.deliveries() < fill.accepted():
                await trio.sleep(0.1)
        fill_peak = ctx.rss_row("filling the backlog", fill)
        fill.stop()
    stored = fill.deliveries(PENDING)
    await ctx.receiver.reset()
    config = write_config(folder, ctx.receiver.url + "/batch", batch=True, concurrency=8)
    drain = Ferry.start(folder, config, ctx.running)
    await ctx.receiver.wait_items(stored, 60)
    await trio.sleep(0.3)
    stats = await ctx.receiver.stats()
    states = drain.counts()
    peak = ctx.rss_row(f"draining {stored:,} events", drain)
    drain.stop()
    seconds = (stats["last"] - drain.ready_at) if stats["items"] >= stored and stats["last"] else None
    value = stored / seconds if seconds else None
    exact = stats["items"] == stored and states["pending"] == 0 and states["dead"] == 0
    ctx.details["backlog_drain"] = {
        "wrk_requests": load.requests,
        "non_2xx": load.non_2xx,
        "stored_backlog": stored,
        "received": stats["items"],
        "requests_received": stats["requests"],
        "drain_s": seconds,
        "restart_to_ready_s": drain.ready_at - drain.launched,
        "startup_s_in_process": drain.startup_s,
        "deliveries_after": states,
        "peak_rss_mib": {"fill": fill_peak, "drain": peak},
        "errors_logged": drain.errors_logged()[:20],
    }
    if not exact:
        ctx.anomalies.append(f"backlog drain: stored {stored}, received {stats['items']}, after: {states}")
    ctx.rows += [
        Row(
            f"restart to READY with a {stored:,}-event backlog",
            drain.ready_at - drain.launched,
            "s",
        ),
        Row(
            f"stored backlog drain, batching sink (READY -> last of {stored:,})",
            value,
            "events/s",
            target=f">= {DRAIN_TARGET:,.0f} events/s",
            passed=value is not None and value >= DRAIN_TARGET and exact,
        ),
    ]


async def _cases(ctx: Context, per_event_only: bool) -> None:
    await per_event_delivery(ctx, await client_ceilings(ctx))
    if not per_event_only:
        await backlog_drain(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events (a smoke run)")
    parser.add_argument("--per-event-only", action="store_true", help="skip the backlog drain (case 4)")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context(args.quick) as ctx:
        trio.run(_cases, ctx, args.per_event_only)
    return report(ctx)


if __name__ == "__main__":
    sys.exit(main())
