"""Encryption at rest on vs off, in the same run: `python -m bench.encryption [--quick]`.

Two pipeline daemons (webhook -> jq transform -> batching http sink, `durability = "full"`), one
with `[store] encryption`, one without, take the same wrk load in alternating rounds. Per round:
ingest req/s, the daemon's CPU per 1,000 events, and whether the sink delivered every stored event
(nothing lost, nothing twice). Then a stored backlog (sink down while it fills) is drained by
each, batching: the read side. Also the cost of sealing and opening one payload, in process.

Reports medians and the on/off ratios; writes bench/out/encryption.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import time
import timeit
from functools import partial
from pathlib import Path

import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry, post_count, post_load, write_config, wrk_missing, wrk_script
from bench.report import Row, machine, write
from daemon.store.at_rest import Cipher

KEY = base64.b64encode(os.urandom(32)).decode()
PAYLOAD = b'{"id": 123456, "first": "Ada", "last": "Lovelace", "email": "ada@example.com"}'


def _config(folder: Path, url: str, *, encrypted: bool, batch: bool = True, timeout: str = "10s") -> Path:
    path = write_config(folder, url, batch=batch, concurrency=8, timeout=timeout)
    if encrypted:
        (folder / "store.key").write_text(KEY)
        text = path.read_text().replace(
            'retention = "1h"\n', f'retention = "1h"\nencryption = {{ key = "file:{folder}/store.key" }}\n', 1
        )
        path.write_text(text)
    return path


async def ingest(ctx: Context) -> None:
    """Alternating wrk rounds against the plain and the encrypting pipeline."""
    script = wrk_script(ctx.tmp)
    daemons = {
        on: Ferry.start(
            ctx.tmp / f"ingest-{on}",
            _config(ctx.tmp / f"ingest-{on}", ctx.receiver.url + "/batch", encrypted=on),
            ctx.running,
        )
        for on in (False, True)
    }
    rps: dict[bool, list[float]] = {False: [], True: []}
    cpu_per_k: dict[bool, list[float]] = {False: [], True: []}
    exact = True
    for _ in range(ctx.rounds):
        for on, ferry in daemons.items():
            before = ferry.accepted()
            await ctx.receiver.reset()
            cpu = ferry.cpu_seconds()
            result = await post_load(ferry.url, script, duration=ctx.duration)
            await trio.sleep(0.2)
            accepted = ferry.accepted() - before
            await ctx.receiver.wait_items(accepted, 30)
            await trio.sleep(0.3)
            final = await ctx.receiver.stats()
            used = ferry.cpu_seconds() - cpu
            exact = exact and final["items"] == accepted and result.non_2xx == 0
            rps[on].append(result.rps)
            cpu_per_k[on].append(1000 * used / max(1, accepted))
            print(
                f"  encryption {'on ' if on else 'off'}: {result.rps:,.0f} req/s, stored {accepted:,}, "
                f"received {final['items']:,}, {1000 * used / max(1, accepted):.2f} CPU s / 1k events",
                flush=True,
            )
    for ferry in daemons.values():
        ferry.stop()
    rps_off, rps_on = statistics.median(rps[False]), statistics.median(rps[True])
    cpu_off, cpu_on = statistics.median(cpu_per_k[False]), statistics.median(cpu_per_k[True])
    ctx.details["ingest"] = {
        "rps": {"off": rps[False], "on": rps[True]},
        "cpu_s_per_1k": {"off": cpu_per_k[False], "on": cpu_per_k[True]},
    }
    if not exact:
        ctx.anomalies.append("ingest: a round lost, duplicated or refused events")
    ctx.rows += [
        Row("durable ingest + batching sink, encryption off (median)", rps_off, "req/s"),
        Row(
            "  the same, encryption on",
            rps_on,
            "req/s",
            rps_off,
            rps_on / rps_off if rps_off else None,
            passed=exact or None,
        ),
        Row("  daemon CPU per 1,000 events, off", cpu_off, "s"),
        Row("  daemon CPU per 1,000 events, on", cpu_on, "s", cpu_off, cpu_on / cpu_off if cpu_off else None),
    ]


async def drain(ctx: Context) -> None:
    """A stored backlog (the sink unreachable while it fills) drained by a restarted daemon."""
    count = 5_000 if ctx.quick else 50_000
    rates: dict[bool, float | None] = {}
    for on in (False, True):
        folder = ctx.tmp / f"drain-{on}"
        with socket.socket() as hole:  # accepts, never answers: every delivery stays pending
            hole.bind(("127.0.0.1", 0))
            hole.listen(1)
            url = f"http://127.0.0.1:{hole.getsockname()[1]}/hole"
            fill = Ferry.start(
                folder, _config(folder, url, encrypted=on, batch=False, timeout="1h"), ctx.running
            )
            await post_count(fill.url, folder, count, limit_s=90)
            with trio.move_on_after(60):
                while fill.deliveries() < fill.accepted():
                    await trio.sleep(0.1)
            fill.stop()
        stored = fill.deliveries()
        await ctx.receiver.reset()
        ferry = Ferry.start(folder, _config(folder, ctx.receiver.url + "/batch", encrypted=on), ctx.running)
        await ctx.receiver.wait_items(stored, 60)
        stats = await ctx.receiver.stats()
        ferry.stop()
        seconds = stats["last"] - ferry.ready_at if stats["items"] >= stored and stats["last"] else None
        rates[on] = stored / seconds if seconds else None
        print(
            f"  drain, encryption {'on ' if on else 'off'}: {stored:,} events in {seconds or 0:.2f} s",
            flush=True,
        )
        if stats["items"] != stored:
            ctx.anomalies.append(
                f"drain ({'on' if on else 'off'}): stored {stored}, received {stats['items']}"
            )
    off, on_rate = rates[False], rates[True]
    ctx.rows += [
        Row("stored backlog drain, batching sink, encryption off", off, "events/s"),
        Row(
            "  the same, encryption on", on_rate, "events/s", off, on_rate / off if off and on_rate else None
        ),
    ]


def in_process(ctx: Context) -> None:
    """Sealing and opening one ~80-byte payload, and one of 1 KiB."""
    cipher = Cipher(os.urandom(32))
    for label, payload in (("80 B", PAYLOAD), ("1 KiB", PAYLOAD * 13)):
        sealed = cipher.seal(payload)
        number = 20_000
        seal_us = min(timeit.repeat(partial(cipher.seal, payload), number=number, repeat=3)) / number * 1e6
        open_us = min(timeit.repeat(partial(cipher.open, sealed), number=number, repeat=3)) / number * 1e6
        ctx.rows += [
            Row(f"seal one {label} payload (AES-256-GCM + base64)", seal_us, "us"),
            Row(f"open one {label} payload", open_us, "us"),
            Row(
                f"  stored size of a {label} payload, sealed / plain",
                len(sealed),
                "bytes",
                len(payload),
                len(sealed) / len(payload),
                baseline_unit="bytes",
            ),
        ]


async def run(ctx: Context) -> None:
    with trio.fail_after(600):
        print("ingest, encryption off vs on ...", flush=True)
        await ingest(ctx)
        print("backlog drain, encryption off vs on ...", flush=True)
        await drain(ctx)
    in_process(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.encryption", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loads and fewer events (a smoke run)")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    info = machine()
    print(f"machine: {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python {info['python']}")
    started = time.monotonic()
    with bench_context(args.quick, prefix="ferry-bench-enc-") as ctx:
        trio.run(run, ctx)
    print()
    report(ctx)  # no targets here: the exit status says whether anything went wrong
    out = write(
        ctx.rows,
        {**ctx.details, "anomalies": ctx.anomalies},
        ctx.settings(),
        Path("bench/out/encryption.json"),
    )
    print(f"\n{time.monotonic() - started:.0f} s in all; written to {out}")
    return 0 if not ctx.anomalies else 1


if __name__ == "__main__":
    sys.exit(main())
