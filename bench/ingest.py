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
import hashlib
import hmac
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry, post_load, write_config, wrk_missing, wrk_script
from bench.listener_bench import PATH, measure, serve_bare
from bench.report import Row

PACE_TARGET_S = 0.5  # backlog at the end of the load, in seconds of ingest
DRAIN_LIMIT_S = 30.0


@dataclass
class Round:
    """One daemon round: wrk's figures, what was stored, and what the receiver got when."""

    bare_rps: float
    bare_cpu_us: float  # this process's CPU per request while it served the bare round
    alone_rps: float
    alone_cpu_us: float  # the store-only daemon's CPU per stored event
    rps: float
    cpu_cores: float
    cpu_us_per_event: float  # the daemon's CPU during the load / events stored: steadier than req/s
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
        bare_cpu = _own_cpu_seconds()
        bare = await measure(serve_bare, script, wrk_args)
        bare_cpu = _own_cpu_seconds() - bare_cpu
        alone_before, alone_cpu = alone.accepted(), alone.cpu_seconds()
        alone_result = await post_load(alone.url, script, duration=ctx.duration)
        alone_cpu = alone.cpu_seconds() - alone_cpu
        await trio.sleep(0.2)  # requests cut off by wrk's end may still commit
        alone_stored = alone.accepted() - alone_before
        before = ferry.accepted()
        await ctx.receiver.reset()
        cpu, started = ferry.cpu_seconds(), time.time()
        result = await post_load(ferry.url, script, duration=ctx.duration)
        ended = time.time()
        used = ferry.cpu_seconds() - cpu
        cores = used / (ended - started)
        at_end = await ctx.receiver.stats()
        await trio.sleep(0.2)  # requests cut off by wrk's end may still commit
        accepted = ferry.accepted() - before
        await ctx.receiver.wait_items(accepted, DRAIN_LIMIT_S)
        await trio.sleep(0.3)  # anything past `accepted` would be a duplicate
        final = await ctx.receiver.stats()
        drained = final["items"] >= accepted and final["last"] is not None
        round_ = Round(
            bare,
            bare_cpu / (bare * ctx.duration) * 1e6 if bare else 0.0,
            alone_result.rps,
            alone_cpu / alone_stored * 1e6 if alone_stored else 0.0,
            result.rps,
            cores,
            used / accepted * 1e6 if accepted else 0.0,
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
    # CPU per request: the bare server's (this process) against each daemon's; bare / daemon is
    # the throughput ratio a CPU-bound daemon can reach, whatever the machine's neighbours do.
    bare_cpu = statistics.median(r.bare_cpu_us for r in rounds)
    pipeline_cpu = statistics.median(r.cpu_us_per_event for r in rounds)
    alone_cpu = statistics.median(r.alone_cpu_us for r in rounds)
    drains = [r.drain_s for r in rounds]
    cpu_us = {"bare": bare_cpu, "store_only": alone_cpu, "pipeline": pipeline_cpu}
    ctx.details["durable_ingest"]["cpu_us"] = cpu_us
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
            "  daemon CPU per stored event during the pipeline load (median)",
            pipeline_cpu,
            "us",
            bare_cpu,
            bare_cpu / pipeline_cpu if pipeline_cpu else None,
            baseline_unit="us bare",
        ),
        Row(
            "  the same, store only (median)",
            alone_cpu,
            "us",
            bare_cpu,
            bare_cpu / alone_cpu if alone_cpu else None,
            baseline_unit="us bare",
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


def _own_cpu_seconds() -> float:
    """User + system CPU of this process (the bare server runs in it; wrk is a child, not counted)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- verification cost: the same store-only daemon with `[sources.bench.verify]` off and on ---------

VERIFY_SECRET = "whsec_bench-0123456789abcdef0123456789abcdef"
VERIFY_VARIANTS = {
    "off": "",
    "stripe signature": 'verify = { scheme = "stripe", secrets = ["file:verify.secret"], replay = false }',
    "stripe signature + replay": 'verify = { scheme = "stripe", secrets = ["file:verify.secret"] }',
}
POOL_SCRIPT = """
-- `part` is a global: wrk's thread:set() gives each thread its own value of it
local pool, threads, sent = {}, 0, 0
part = 0
function setup(thread)
  thread:set("part", threads)
  threads = threads + 1
end
function init(args)
  local data = io.open("%(pool)s", "rb"):read("*a")
  local start = 1
  while true do
    local stop = string.find(data, "\\0", start, true)
    if stop == nil then break end
    pool[#pool + 1] = string.sub(data, start, stop - 1)
    start = stop + 1
  end
end
function request()
  sent = sent + 1
  return pool[((sent - 1) * %(threads)d + part) %% #pool + 1]
end
"""


def signed_pool(folder: Path, count: int, threads: int) -> Path:
    """A wrk script sending `count` distinct Stripe-signed requests (each thread its own share).

    Every request is unique (its body carries a serial number and is signed afresh), so replay
    protection refuses none of them while the pool lasts; the pool is made per round.
    """
    pool = folder / f"pool-{time.monotonic_ns()}.bin"
    stamp = int(time.time())
    key = VERIFY_SECRET.encode()
    with pool.open("wb") as out:
        for serial in range(count):
            body = b'{"id": %d, "first": "Ada", "last": "Lovelace", "email": "ada@example.com"}' % serial
            signature = hmac.new(key, b"%d." % stamp + body, hashlib.sha256).hexdigest()
            out.write(
                b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Stripe-Signature: t=%d,v1=%s\r\nContent-Length: %d\r\n\r\n%s\0"
                % (PATH.encode(), stamp, signature.encode(), len(body), body)
            )
    script = pool.with_suffix(".lua")
    script.write_text(POOL_SCRIPT % {"pool": pool, "threads": threads})
    return script


async def verified_ingest(ctx: Context) -> None:
    """Webhook -> store only, with verification off, signature only, and signature + replay check.

    Same run, rounds alternating between the three daemons, the same signed requests for each
    (a daemon without `verify` ignores the signature header); medians and ratios to "off".
    """
    daemons = {}
    for index, (name, verify) in enumerate(VERIFY_VARIANTS.items()):
        folder = ctx.tmp / f"verify-{index}"
        config = write_config(folder, None)
        (folder / "verify.secret").write_text(VERIFY_SECRET)
        config.write_text(config.read_text() + verify + "\n")
        daemons[name] = Ferry.start(folder, config, ctx.running)
    pool_size = 12_000 * ctx.duration  # well above what one daemon answers in `duration` here
    rates: dict[str, list[float]] = {name: [] for name in daemons}
    for _ in range(ctx.rounds):
        for name, ferry in daemons.items():
            script = signed_pool(ctx.tmp, pool_size, threads=2)
            before = ferry.accepted()
            result = await post_load(ferry.url, script, duration=ctx.duration)
            await trio.sleep(0.2)  # requests cut off by wrk's end may still commit
            stored = ferry.accepted() - before
            if result.non_2xx or result.socket_errors or stored < result.requests * 0.99:
                ctx.anomalies.append(
                    f"verified ingest ({name}): {result.non_2xx} non-2xx, socket errors "
                    f"{result.socket_errors}, {stored} stored of {result.requests} requests"
                )
            rates[name].append(result.rps)
        print("  round: " + ", ".join(f"{name} {rates[name][-1]:,.0f} req/s" for name in daemons), flush=True)
    for ferry in daemons.values():
        ferry.stop()
    off = statistics.median(rates["off"])
    ctx.details["verified_ingest"] = {"rates": rates}
    ctx.rows.append(Row("webhook -> store, verification off (median)", off, "req/s"))
    for name in list(daemons)[1:]:
        value = statistics.median(rates[name])
        ctx.rows.append(Row(f"  the same, verify = {name} (median)", value, "req/s", off, value / off))


def main(argv: list[str]) -> int:
    """`python -m bench.ingest [--quick]`: only the verification cost comparison (no sink, no receiver)."""
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context("--quick" in argv, prefix="ferry-bench-verify-", receiver=False) as context:
        trio.run(verified_ingest, context)
    report(context)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
