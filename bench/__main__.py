"""`make bench`: every speed figure of ferry, against baselines measured in the same run.

    .venv/bin/python -m bench [--quick]

Cases (docs/performance.md explains each figure):

1. baseline: a bare trio + h11 server answering 202 with no work, under wrk -t2 -c50;
2. durable ingest: `ferry run` (durability = "full", jq transform, batching HTTP sink) under
   the same load, and whether the sink keeps pace;
   2b. webhook -> store with `[sources.NAME.verify]` off, signature only, signature + replay;
   2c. the CPU the pipeline must add per event at least, and the ingest ratio that leaves
       (bench/floor.py);
   2d. CPU per delivered event (per-event sink) and per ingested event (batching sink) against
       the bare server's CPU per request, rounds alternating (bench/cpu.py), each beside the
       design's floor for it (bench/skeleton.py, per-event and --batch);
3. the HTTP clients' CPU per request against httpx's (httpcore, the h11 path, `LeanClient`; 1 and
   16 tasks, bench/client_bench.py), then per-event delivery end to end (no batching,
   concurrency 16) against the lean client's ceiling;
4. a stored backlog drained after a restart, and the restart's time to READY;
5. webhook → sink latency at a steady 500 events/s;
6. the rate limiter's overhead per permit (bench/ratelimit.py), against an empty checkpoint;
7. polling a paginated API (tests/fake_api.py) into the store, beside a bare httpx loop (bench/poll.py);
   7b. requests and quota spent per cycle on an unchanged 12-page listing, before/after per-page
       validators and with `newest_first` (bench/quota.py);
8. events/s through a typical jq map in ferry's transformer, against the `jq` command on the same
   events (bench/transform.py), and what routes and schema validation cost;
9. the peers, Node-RED and a Huey relay, each installed into a scratch folder and under the
   same loads as ferry (bench/peers.py), with ratios;
10. the daemon's peak RSS in each case;
11. one node on PostgreSQL against one on SQLite: durable ingest and per-event delivery through
    the store, the whole daemon's ingest under wrk, statements per event (bench/backends.py);
12. cluster-wide rate budgets: the shared PostgreSQL row vs shares by live node count
    (bench/budget.py; skipped with a row saying so when no PostgreSQL server answers);
13. cluster mode: one node on PostgreSQL vs one on SQLite (ingest, per-event delivery, drain),
    two nodes vs one, CPU and round trips per event, and the projection to N machines
    (bench/cluster.py; skipped likewise).

Everything binds 127.0.0.1; the sink's receiver is a separate process (`bench.receiver`).
The table is printed and written to bench/out/latest.json. Exit status: 0 when every
target is met, 1 when one is not, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import trio

from bench.backends import store_backends
from bench.budget import budget_mechanisms
from bench.cluster import cluster_figures
from bench.context import Context, bench_context, report
from bench.cpu import cpu_figures
from bench.delivery import backlog_drain, client_ceilings, per_event_delivery
from bench.floor import pipeline_floor
from bench.harness import wrk_missing
from bench.ingest import durable_ingest, verified_ingest
from bench.latency import latency
from bench.peers import peers
from bench.poll import poll_ingest
from bench.quota import poll_quota
from bench.ratelimit import ratelimit_overhead
from bench.report import Row, machine, write
from bench.tracing import tracing_cost
from bench.transform import transform_throughput

LIMIT_S = 2400  # the whole run, even if something hangs (the peers and the cluster cases need minutes)


async def run(ctx: Context) -> None:
    with trio.fail_after(LIMIT_S):
        steps = [
            ("1-2. bare h11 baseline vs durable ingest", durable_ingest),
            ("2b. webhook verification cost (off vs on)", verified_ingest),
            ("2c. the pipeline's floor and the one-process ceiling", pipeline_floor),
            ("2d. CPU per event against a bare request (issue 16)", cpu_figures),
            ("3. per-event delivery", _delivery),
            ("4. backlog drain", backlog_drain),
            ("5. latency", latency),
            ("6. rate limiter overhead", ratelimit_overhead),
            ("7. polling", poll_ingest),
            ("7b. polling: requests and quota per cycle", poll_quota),
            ("8. transform throughput vs jq", transform_throughput),
            ("9. peers: Node-RED, Huey relay", peers),
            ("10. tracing cost", tracing_cost),
            ("11. PostgreSQL vs SQLite", store_backends),
            ("12. cluster-wide rate budgets", budget_mechanisms),
            ("13. cluster mode (PostgreSQL)", cluster_figures),
        ]
        for title, step in steps:
            print(f"{title} ...", flush=True)
            started = time.monotonic()
            try:
                await step(ctx)
            except Exception as exc:  # one broken case must not hide the others' figures
                traceback.print_exc()
                ctx.anomalies.append(f"{title}: did not complete: {type(exc).__name__}: {exc}")
                ctx.rows.append(Row(f"{title}: did not complete", None, "", passed=False))
                for ferry in ctx.running:
                    ferry.stop()
            print(f"   ({time.monotonic() - started:.0f} s)", flush=True)


async def _delivery(ctx: Context) -> None:
    await per_event_delivery(ctx, await client_ceilings(ctx))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loads and fewer events (a smoke run)")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    info = machine()
    print(f"machine: {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python {info['python']}")
    print(f"date: {info['date']}")
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.2f} at start; other work here skews every figure")
    started = time.monotonic()
    with bench_context(args.quick) as ctx:
        trio.run(run, ctx)
    rows = ctx.rows + ctx.memory
    print()
    status = report(ctx, rows)
    out = write(rows, {**ctx.details, "anomalies": ctx.anomalies}, ctx.settings())
    print(f"\n{time.monotonic() - started:.0f} s in all; written to {out.relative_to(Path.cwd())}")
    return status


if __name__ == "__main__":
    sys.exit(main())
