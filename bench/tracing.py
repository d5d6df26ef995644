"""Case 10: what tracing costs durable ingest, at the default sampling, against tracing off.

Two pipeline daemons (webhook -> jq -> batching HTTP sink, as in case 2) run side by side: one
with `traces = false`, one with `[telemetry]`'s default `sample_ratio` exporting to a null OTLP
collector (`bench.otlp_sink`, its own process, so every batch is really encoded and sent).
Rounds alternate between them under the same wrk load; the figure is the median of the traced
daemon's rate over the untraced one's, with the daemons' CPU time per stored event beside it
(steadier than rates when other processes share the machine). Target: >= 0.85x.

    .venv/bin/python -m bench.tracing [--quick]     # this case alone
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry, post_load, write_config, wrk_missing, wrk_script
from bench.report import Row
from daemon.config.sections import TelemetryConfig

TARGET = 0.85
DEFAULT_RATIO = TelemetryConfig().sample_ratio


@dataclass
class TracingRound:
    off_rps: float
    on_rps: float
    off_us_per_event: float
    on_us_per_event: float


class OtlpSink:
    """`bench.otlp_sink` as a child process; `url` is its base URL."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink"],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _round(ferry: Ferry, ctx: Context, script: Path) -> tuple[float, float]:
    """(req/s, CPU µs per stored event) of one timed load."""
    cpu, stored = ferry.cpu_seconds(), ferry.accepted()
    result = await post_load(ferry.url, script, duration=ctx.duration)
    await trio.sleep(0.5)  # let the tail commit
    events = ferry.accepted() - stored
    return result.rps, (ferry.cpu_seconds() - cpu) / max(1, events) * 1e6


async def tracing_cost(ctx: Context) -> None:
    otlp = OtlpSink()
    try:
        url = ctx.receiver.url + "/batch"
        off_folder, on_folder = ctx.tmp / "tracing_off", ctx.tmp / "tracing_on"
        off = Ferry.start(off_folder, write_config(off_folder, url, batch=True, traces=False), ctx.running)
        on = Ferry.start(
            on_folder,
            write_config(on_folder, url, batch=True, traces=True, sample_ratio=DEFAULT_RATIO, otlp=otlp.url),
            ctx.running,
        )
        script = wrk_script(ctx.tmp)
        rounds: list[TracingRound] = []
        for n in range(ctx.rounds):
            first, second = (off, on) if n % 2 == 0 else (on, off)
            figures = {
                id(first): await _round(first, ctx, script),
                id(second): await _round(second, ctx, script),
            }
            (off_rps, off_us), (on_rps, on_us) = figures[id(off)], figures[id(on)]
            rounds.append(TracingRound(off_rps, on_rps, off_us, on_us))
            print(
                f"  round: traces off {off_rps:,.0f} req/s ({off_us:.0f} µs CPU/event), "
                f"on at {DEFAULT_RATIO:g} {on_rps:,.0f} req/s ({on_us:.0f} µs CPU/event)",
                flush=True,
            )
        on.stop()
        off.stop()
    finally:
        otlp.stop()
    ctx.details["tracing"] = {"sample_ratio": DEFAULT_RATIO, "rounds": [asdict(r) for r in rounds]}
    off_rps = statistics.median(r.off_rps for r in rounds)
    on_rps = statistics.median(r.on_rps for r in rounds)
    ratio = statistics.median(r.on_rps / r.off_rps for r in rounds)
    cpu_ratio = statistics.median(r.on_us_per_event / r.off_us_per_event for r in rounds)
    ctx.rows += [
        Row(
            f"durable ingest, traces on (sample_ratio {DEFAULT_RATIO:g}) vs off (median)",
            on_rps,
            "req/s",
            off_rps,
            ratio,
            f">= {TARGET:g}x traces off",
            ratio >= TARGET,
        ),
        Row(
            "  daemon CPU per stored event, traces on vs off (median)",
            statistics.median(r.on_us_per_event for r in rounds),
            "µs",
            statistics.median(r.off_us_per_event for r in rounds),
            cpu_ratio,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s loads, 1 round")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context(args.quick, prefix="ferry-bench-tracing-") as ctx:
        trio.run(tracing_cost, ctx)
    return report(ctx)


if __name__ == "__main__":
    sys.exit(main())
