"""Cases 1 and 2: the bare h11 baseline, and durable ingest with a batching sink keeping pace.

Rounds alternate: bare server (in this process, `listener_bench.serve_bare`), then the
daemon (its own process, one for all rounds) under the same wrk load. For diagnosis, each
round also loads a second daemon that only stores events (no transform, no sink), and
records how much CPU the pipeline daemon used. After each daemon
round the sink must deliver every stored event to the receiver; how far behind it was when
the load stopped (backlog) and how long it then took to catch up are the "keeps pace" figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass

import trio

from bench.context import Context
from bench.harness import Ferry, post_load, write_config, wrk_script
from bench.listener_bench import measure, serve_bare
from bench.report import Row

PACE_TARGET_S = 0.5  # backlog at the end of the load, in seconds of ingest
DRAIN_LIMIT_S = 30.0


@dataclass
class Round:
    """One daemon round: wrk's figures, what was stored, and what the receiver got when."""

    bare_rps: float
    alone_rps: float
    rps: float
    cpu_cores: float
    wrk_requests: int
    non_2xx: int
    socket_errors: str | None
    accepted: int
    delivered_at_end_of_load: int
    received: int
    requests_received: int
    drain_s: float | None

    @property
    def backlog_at_end_of_load(self) -> int:
        return self.accepted - self.delivered_at_end_of_load

    @property
    def exact(self) -> bool:
        """Every stored event arrived, and nothing more."""
        return self.received == self.accepted


async def durable_ingest(ctx: Context) -> None:
    folder = ctx.tmp / "ingest"
    config = write_config(folder, ctx.receiver.url + "/batch", batch=True, concurrency=8)
    script = wrk_script(ctx.tmp)
    wrk_args = argparse.Namespace(threads=2, connections=50, duration=ctx.duration)
    ferry = Ferry.start(folder, config, ctx.running)
    alone = Ferry.start(ctx.tmp / "ingest_alone", write_config(ctx.tmp / "ingest_alone", None), ctx.running)
    rounds: list[Round] = []
    for _ in range(ctx.rounds):
        bare = await measure(serve_bare, script, wrk_args)
        alone_result = await post_load(alone.url, script, duration=ctx.duration)
        before = ferry.accepted()
        await ctx.receiver.reset()
        cpu, started = ferry.cpu_seconds(), time.time()
        result = await post_load(ferry.url, script, duration=ctx.duration)
        ended = time.time()
        cores = (ferry.cpu_seconds() - cpu) / (ended - started)
        at_end = await ctx.receiver.stats()
        await trio.sleep(0.2)  # requests cut off by wrk's end may still commit
        accepted = ferry.accepted() - before
        await ctx.receiver.wait_items(accepted, DRAIN_LIMIT_S)
        await trio.sleep(0.3)  # anything past `accepted` would be a duplicate
        final = await ctx.receiver.stats()
        drained = final["items"] >= accepted and final["last"] is not None
        round_ = Round(
            bare,
            alone_result.rps,
            result.rps,
            cores,
            result.requests,
            result.non_2xx,
            result.socket_errors,
            accepted,
            at_end["items"],
            final["items"],
            final["requests"],
            max(0.0, final["last"] - ended) if drained else None,
        )
        rounds.append(round_)
        if not round_.exact:
            ctx.anomalies.append(
                f"durable ingest: stored {accepted} events, the receiver got {final['items']}"
            )
        for name, load in (("ingest alone", alone_result), ("pipeline", result)):
            if load.non_2xx or load.socket_errors:
                ctx.anomalies.append(
                    f"{name}: {load.non_2xx} non-2xx answers; socket errors: {load.socket_errors}"
                )
        print(
            f"  round: bare {bare:,.0f} req/s, ingest alone {alone_result.rps:,.0f} req/s, "
            f"pipeline {result.rps:,.0f} req/s ({cores:.2f} cores), stored {accepted:,}, "
            f"backlog at end {round_.backlog_at_end_of_load:,}, received {final['items']:,}",
            flush=True,
        )
    states = ferry.counts()
    peak = ctx.rss_row("durable ingest", ferry)
    ferry.stop()
    alone.stop()
    ctx.details["durable_ingest"] = {
        "rounds": [{**asdict(r), "backlog_at_end_of_load": r.backlog_at_end_of_load} for r in rounds],
        "deliveries": states,
        "peak_rss_mib": peak,
        "errors_logged": ferry.errors_logged()[:20],
    }

    base = statistics.median(r.bare_rps for r in rounds)
    value = statistics.median(r.rps for r in rounds)
    alone_value = statistics.median(r.alone_rps for r in rounds)
    clean = all(r.non_2xx == 0 and not r.socket_errors for r in rounds)
    ingest_rate = statistics.median(r.accepted / ctx.duration for r in rounds)
    backlog = max(r.backlog_at_end_of_load for r in rounds)
    drains = [r.drain_s for r in rounds]
    ctx.rows += [
        Row("bare trio+h11 server, 202, no work (median)", base, "req/s"),
        Row(
            "durable ingest: ferry, full fsync, batching sink (median)",
            value,
            "req/s",
            base,
            value / base,
            ">= 0.75x baseline",
            value / base >= 0.75 and clean,
        ),
        Row(
            "  the same, webhook -> store only (no transform, no sink)",
            alone_value,
            "req/s",
            base,
            alone_value / base,
        ),
        Row(
            "  daemon CPU during the pipeline load (median)",
            statistics.median(r.cpu_cores for r in rounds),
            "cores",
        ),
        Row(
            "batching sink backlog when the load stops (worst)",
            backlog,
            "events",
            ingest_rate,
            backlog / ingest_rate if ingest_rate else None,
            f"<= {PACE_TARGET_S:g} s of ingest",
            ingest_rate > 0 and backlog / ingest_rate <= PACE_TARGET_S,
            baseline_unit="events/s",
            ratio_unit="s",
        ),
        Row(
            "time to deliver that backlog after the load (worst)",
            None if None in drains else max(d for d in drains if d is not None),
            "s",
            target="all delivered, none twice",
            passed=all(r.exact for r in rounds) and states["pending"] == 0 and states["dead"] == 0,
        ),
    ]
