"""Cluster mode's figures (issue 15): one node on PostgreSQL vs one on SQLite, two nodes vs one,
database round trips and CPU per event, and a projection of N nodes on N machines.

    .venv/bin/python -m bench.cluster [--quick]

Cases, each on the PostgreSQL server at `FERRY_BENCH_POSTGRES` (default 127.0.0.1:5432, a
scratch database per case, dropped after) and on SQLite with the same config otherwise, rounds
alternating between the two:

1. durable ingest: wrk (-t2 -c50) against webhook -> store only (no transform, no sink);
2. per-event delivery: webhook -> jq -> http sink (no batching, concurrency 16), events/s at
   the receiver for a fixed count;
3. drain: a stored backlog (filled while the sink's URL never answers), delivered by a batching
   sink after a restart, READY -> last item;
4. two nodes vs one on one database: the same ingest load split between two daemons (one wrk
   each, -t1 -c25) against one daemon under both wrks' load.

Per event, for the PostgreSQL runs: the daemon's CPU (/proc), the CPU of the database's server
processes serving it (the backends of its connections, /proc; the WAL writer and checkpointer are
not counted), transactions (`pg_stat_database.xact_commit`) and round trips. Round trips are the
data segments the daemon's sockets to PostgreSQL sent (`ss -ti`, `data_segs_out`): each query
the client sends and waits for is one; pg_stat_statements would be exact but needs the server
restarted with it preloaded, which a shared server here cannot be.

The projection: a node on its own machine reaches ~1e6 / (daemon CPU us per event) events/s on
one core; N of them reach N times that while the database has headroom; the database's cores
run out at cores / (server CPU per event), and its commit rate at the measured transactions per
event. This machine has 2 cores for wrk, the daemons and PostgreSQL together (and is shared), so
the second node is projected, not shown.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio

from bench.context import Context, bench_context, report
from bench.harness import (
    SOURCE,
    Ferry,
    log_time,
    post_count,
    post_load,
    write_config,
    wrk_missing,
    wrk_script,
)
from bench.listener_bench import WrkResult
from bench.report import Row
from tests.fakes import Daemon

ADMIN_URL = os.environ.get("FERRY_BENCH_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
PER_EVENT_CONCURRENCY = 16


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh database on the server, dropped afterwards."""
    name = f"ferry_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{ADMIN_URL.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def on_postgres(config: Path, node: str) -> Path:
    """The bench config `config` with its store moved to the database in $FERRY_DATABASE_URL."""
    text = re.sub(
        r'\[store\]\npath = "[^"]*"\n',
        '[store]\nbackend = "postgres"\nurl = "env:FERRY_DATABASE_URL"\n',
        config.read_text(),
    )
    config.write_text(text + f'\n[cluster]\nnode_id = "{node}"\n')
    return config


def start(folder: Path, config: Path, ctx: Context, url: str | None) -> Ferry:
    """`Ferry.start`, with the database URL in the daemon's environment when `url` is given."""
    env = {} if url is None else {"FERRY_DATABASE_URL": url}
    daemon = Daemon(config, folder / f"ferry-{len(ctx.running)}.log", env=env)
    ferry = Ferry(folder, daemon, time.time(), 0.0, 0.0)
    ctx.running.append(ferry)
    daemon.start(timeout=60)
    line = daemon.wait_log(lambda entry: entry.get("msg") == "ready")
    ferry.ready_at, ferry.startup_s = log_time(line["ts"]), float(line["startup_s"])
    return ferry


def pg_int(url: str, sql: str, *params: object) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def server_pids(url: str) -> list[int]:
    """The server processes (backends) serving connections to `url`'s database, but our own."""
    name = url.rpartition("/")[2]
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def segments_to_postgres(pid: int) -> int:
    """Data segments the process's TCP sockets to the server's port have sent, in all."""
    port = psycopg.conninfo.conninfo_to_dict(ADMIN_URL).get("port", "5432")
    out = subprocess.run(
        ["ss", "-tinpH", "dst", f":{port}"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            mine = f"pid={pid}," in line
            continue
        if mine and (found := re.search(r"data_segs_out:(\d+)", line)):
            total += int(found.group(1))
    return total


class Meter:
    """CPU, transactions and round trips of one PostgreSQL node between `start()` and `stop()`."""

    def __init__(self, url: str, ferry: Ferry) -> None:
        self.url, self.ferry = url, ferry

    def start(self) -> None:
        self.pids = server_pids(self.url)
        self.server0, self.daemon0 = cpu_of(self.pids), self.ferry.cpu_seconds()
        self.segs0 = segments_to_postgres(self.ferry.pid)
        self.xacts0 = self._xacts()

    def _xacts(self) -> int:
        return pg_int(
            ADMIN_URL,
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
            self.url.rpartition("/")[2],
        )

    def stop(self, events: int) -> dict[str, float]:
        per = max(1, events)
        return {
            "daemon_cpu_us": (self.ferry.cpu_seconds() - self.daemon0) / per * 1e6,
            "server_cpu_us": (cpu_of(self.pids) - self.server0) / per * 1e6,
            "round_trips": (segments_to_postgres(self.ferry.pid) - self.segs0) / per,
            "transactions": (self._xacts() - self.xacts0) / per,
        }


def accepted(ferry: Ferry, url: str | None) -> int:
    if url is None:
        return ferry.accepted()
    return pg_int(url, "SELECT count(*) FROM events WHERE stream = %s", SOURCE)


async def _ingest_round(ctx: Context, script: Path, url: str | None, n: int) -> dict[str, Any]:
    folder = ctx.tmp / f"ingest-{'pg' if url else 'sqlite'}-{n}"
    config = write_config(folder, None)
    ferry = start(folder, on_postgres(config, f"ingest{n}") if url else config, ctx, url)
    meter = Meter(url, ferry) if url else None
    cpu = ferry.cpu_seconds()
    if meter:
        meter.start()
    result = await post_load(ferry.url, script, duration=ctx.duration)
    await trio.sleep(0.2)
    stored = accepted(ferry, url)
    figures: dict[str, Any] = {"rps": result.rps, "stored": stored, "non_2xx": result.non_2xx}
    figures |= (
        meter.stop(stored) if meter else {"daemon_cpu_us": (ferry.cpu_seconds() - cpu) / max(1, stored) * 1e6}
    )
    ferry.stop()
    return figures


async def durable_ingest(ctx: Context) -> dict[str, Any]:
    script = wrk_script(ctx.tmp)
    rounds: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgres": []}
    for n in range(ctx.rounds):
        rounds["sqlite"].append(await _ingest_round(ctx, script, None, n))
        with scratch_database() as url:
            rounds["postgres"].append(await _ingest_round(ctx, script, url, n))
        print(
            f"  ingest round {n}: sqlite {rounds['sqlite'][-1]['rps']:,.0f} req/s, "
            f"postgres {rounds['postgres'][-1]['rps']:,.0f} req/s",
            flush=True,
        )
    return rounds


async def _load_into(loads: list[WrkResult], ferry: Ferry, script: Path, duration: float) -> None:
    loads.append(await post_load(ferry.url, script, duration=duration, threads=1, connections=25))


async def two_nodes(ctx: Context) -> dict[str, Any]:
    """Ingest on one node under two wrks vs the same two wrks on two nodes of one database."""
    script = wrk_script(ctx.tmp)
    out: dict[str, list[float]] = {"one": [], "two": []}
    for n in range(ctx.rounds):
        for case in ("one", "two"):
            with scratch_database() as url:
                nodes = []
                for i in range(1 if case == "one" else 2):
                    folder = ctx.tmp / f"nodes-{case}-{n}-{i}"
                    nodes.append(
                        start(folder, on_postgres(write_config(folder, None), f"{case}{n}{i}"), ctx, url)
                    )
                targets = [nodes[0], nodes[0]] if case == "one" else nodes

                loads: list[WrkResult] = []
                async with trio.open_nursery() as nursery:
                    for ferry in targets:
                        nursery.start_soon(_load_into, loads, ferry, script, ctx.duration)
                out[case].append(sum(result.rps for result in loads))
                for ferry in nodes:
                    ferry.stop()
        print(
            f"  nodes round {n}: one {out['one'][-1]:,.0f} req/s, two {out['two'][-1]:,.0f} req/s", flush=True
        )
    return out


async def _delivery_round(ctx: Context, url: str | None, n: int, count: int) -> dict[str, Any]:
    folder = ctx.tmp / f"deliver-{'pg' if url else 'sqlite'}-{n}"
    config = write_config(folder, ctx.receiver.url + "/event", batch=False, concurrency=PER_EVENT_CONCURRENCY)
    ferry = start(folder, on_postgres(config, f"deliver{n}") if url else config, ctx, url)
    meter = Meter(url, ferry) if url else None
    await ctx.receiver.reset()
    cpu = ferry.cpu_seconds()
    if meter:
        meter.start()
    await post_count(ferry.url, folder, count, limit_s=60)
    await trio.sleep(0.2)
    stored = accepted(ferry, url)
    await ctx.receiver.wait_items(stored, max(30.0, stored / 200))
    stats = await ctx.receiver.stats()
    span = (stats["last"] or 0.0) - (stats["first"] or 0.0)
    figures: dict[str, Any] = {
        "events_s": (stats["items"] - 1) / span if span > 0 else None,
        "stored": stored,
        "received": stats["items"],
    }
    figures |= (
        meter.stop(stats["items"])
        if meter
        else {"daemon_cpu_us": (ferry.cpu_seconds() - cpu) / max(1, stats["items"]) * 1e6}
    )
    ferry.stop()
    return figures


async def _drain_round(ctx: Context, url: str | None, n: int, count: int) -> dict[str, Any]:
    import socket

    folder = ctx.tmp / f"drain-{'pg' if url else 'sqlite'}-{n}"
    with socket.socket() as hole:  # accepts (in the kernel's backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        fill_config = write_config(
            folder, f"http://127.0.0.1:{hole.getsockname()[1]}/hole", concurrency=1, timeout="1h"
        )
        fill = start(folder, on_postgres(fill_config, f"drain{n}") if url else fill_config, ctx, url)
        await post_count(fill.url, folder, count, limit_s=90)
        await trio.sleep(2.0)  # the transform turns the last events into deliveries
        fill.stop()  # the same node id below: a restarted node takes its own claims back at once
    stored = accepted(fill, url)
    await ctx.receiver.reset()
    config = write_config(folder, ctx.receiver.url + "/batch", batch=True, concurrency=8)
    drain = start(folder, on_postgres(config, f"drain{n}") if url else config, ctx, url)
    await ctx.receiver.wait_items(stored, 90)
    stats = await ctx.receiver.stats()
    drain.stop()
    seconds = (stats["last"] - drain.ready_at) if stats["items"] >= stored and stats["last"] else None
    return {"events_s": stored / seconds if seconds else None, "stored": stored, "received": stats["items"]}


async def delivery_and_drain(ctx: Context) -> dict[str, Any]:
    count, backlog = (2000, 5000) if ctx.quick else (5000, 20_000)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {
        "per_event": {"sqlite": [], "postgres": []},
        "drain": {"sqlite": [], "postgres": []},
    }
    for n in range(ctx.rounds):
        out["per_event"]["sqlite"].append(await _delivery_round(ctx, None, n, count))
        with scratch_database() as url:
            out["per_event"]["postgres"].append(await _delivery_round(ctx, url, n, count))
        out["drain"]["sqlite"].append(await _drain_round(ctx, None, n, backlog))
        with scratch_database() as url:
            out["drain"]["postgres"].append(await _drain_round(ctx, url, n, backlog))
        print(
            f"  delivery round {n}: {out['per_event']['sqlite'][-1]['events_s']} vs "
            f"{out['per_event']['postgres'][-1]['events_s']} events/s; drain "
            f"{out['drain']['sqlite'][-1]['events_s']} vs {out['drain']['postgres'][-1]['events_s']}",
            flush=True,
        )
    return out


def commit_latency_ms(samples: int = 100) -> float:
    """Median time of one single-row commit with synchronous_commit on (the WAL flush)."""
    with scratch_database() as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        times = []
        for i in range(samples):
            began = time.perf_counter()
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


async def measure(ctx: Context) -> dict[str, Any]:
    return {
        "ingest": await durable_ingest(ctx),
        "nodes": await two_nodes(ctx),
        **await delivery_and_drain(ctx),
        "commit_ms": await trio.to_thread.run_sync(commit_latency_ms),
        "cores": os.cpu_count(),
    }


async def cluster_figures(ctx: Context) -> None:
    """The `python -m bench` case; one row saying why when no PostgreSQL server answers."""
    from bench.cluster_report import rows

    try:
        pg_int(ADMIN_URL, "SELECT 1")
    except psycopg.OperationalError as exc:
        ctx.rows.append(Row(f"cluster: not measured, no PostgreSQL at {ADMIN_URL} ({exc})", None, ""))
        return
    figures = await measure(ctx)
    ctx.details["cluster"] = figures
    ctx.rows.extend(rows(figures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, shorter loads")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context(args.quick) as ctx:
        trio.run(cluster_figures, ctx)
    return report(ctx)


if __name__ == "__main__":
    sys.exit(main())
