"""Issue 16's CPU figures in one run: what ferry spends per event against a bare request.

    .venv/bin/python -m bench.cpu [--quick] [--rounds N] [--profile DIR] [--baseline TREE]

Rounds alternate these loads, each CPU time of the process doing the work:

- **bare**: `listener_bench.serve_bare` (trio + h11, 202, no work) in this process under
  `wrk -t2 -c50`; this process's user + system CPU per request (wrk is a child, not counted);
- **per-event delivery**: a daemon with the jq transform and a per-event HTTP sink
  (concurrency 16) takes N events from wrk and delivers each in its own request to the
  receiver; its CPU from the first POST to the last delivery, per delivered event; beside it,
  the CPU of its threads other than the event loop's (the store's writer, mostly) and its
  context switches, per delivered event (`/proc/PID/task`);
- **the design's floor**: `bench.skeleton` (listener, store, transform and sink as bare trio
  tasks over ferry's own store, jq program, `LeanClient` and outcome committer; no metrics,
  logs, traces, guard or supervisor) under the per-event load, measured exactly like the
  per-event daemon (its own process, /proc, the same count, the same receiver). It is the least
  CPU per delivered event that DESIGN.md's contract allows with these parts: if it is over 3x
  bare, so is every daemon that keeps the contract. Beside it, the daemon's CPU over it;
- **pipeline ingest**: a daemon with the transform and a batching sink (500 items, 20 ms,
  concurrency 8) under the same timed wrk load as the bare server; its CPU over the load,
  per stored event (case 2's "daemon CPU per stored event"); beside it, the CPU of its threads
  other than the event loop's over the load, per stored event;
- **the design's floor for pipeline ingest**: `bench.skeleton --batch` (the skeleton above with
  a batching sink of the same shape: groups of up to 500 due deliveries, 20 ms to fill, 8
  workers, one JSON array per request, the batch's outcomes in one `record_outcomes`) under the
  same timed load, in the same rounds, measured exactly like the pipeline daemon (its stored
  events counted in its own SQLite file). If bare / it is under 0.55, so is every daemon that
  keeps the contract with these parts. Beside it, the pipeline daemon's CPU over it.

Every per-event load checks that each stored event reached the receiver once under its own
idempotency key, every pipeline load that the receiver got as many items as were stored; an
ANOMALY line says when not (stored vs received, requests vs distinct keys).

Goals (issue 16): per-event delivery <= 3x the bare CPU per request; pipeline ingest <= 150 us
per event, i.e. bare / pipeline >= 0.55 (the issue's quiet machine: 87 us bare); the ratio is
judged, since a shared machine inflates every us (bare ran at 250-300 us here while others
worked). CPU per event moves far less than req/s when other work shares the machine, so these
are the figures to compare changes by; medians of the rounds.

`--profile DIR`: also runs `py-spy record` (when installed) on each daemon during its load in
an extra round that no figure counts, into DIR/per_event.raw, DIR/pipeline.raw,
DIR/skeleton.raw and DIR/skeleton_pipeline.raw (py-spy's collapsed stacks; `python -m
bench.profile FILE` sums them per function; FERRY_BENCH_SPY_ARGS=--threads keeps threads apart).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import trio

from bench.context import Context, bench_context, report
from bench.floor import measure as floor_measure
from bench.harness import Ferry, Skeleton, post_count, post_load, write_config, wrk_missing, wrk_script
from bench.listener_bench import measure, serve_bare
from bench.report import Row
from daemon.http.client import LeanClient

PER_EVENT_TARGET = 3.0  # x the bare server's CPU per request
PIPELINE_TARGET_US = 150.0  # on the quiet machine of issue 16, whose bare server took 87 us
PIPELINE_TARGET_RATIO = 0.55  # the same target as a ratio, judged: on a busy machine every us grows
CONCURRENCY = 16


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_cpu_us(ctx: Context) -> float:
    """This process's CPU per request while ferry's `LeanClient` (CONCURRENCY tasks) posts the
    bench body to the receiver (a process of its own) back to back: the sink's HTTP client alone."""
    from bench.client_bench import ferry_post
    from bench.client_bench import measure as posting

    client = LeanClient()
    try:
        post = ferry_post(client, ctx.receiver.url + "/client")
        await posting(post, CONCURRENCY, 0.2)  # warm up: connections
        _, cpu_us = await posting(post, CONCURRENCY, 1.0 if ctx.quick else 2.0)
    finally:
        await client.aclose()
    # The posts cut short at the deadline may still be on their way; counted after the next
    # load's reset, they would pass for its deliveries (or its re-sends).
    with trio.move_on_after(5):
        seen = -1
        while seen != (seen := (await ctx.receiver.stats())["requests"]):
            await trio.sleep(0.05)
    return cpu_us


async def bare_cpu_us(ctx: Context) -> float:
    """This process's CPU per request while it serves wrk's load as the bare server."""
    args = argparse.Namespace(threads=2, connections=50, duration=ctx.duration)
    before = _own_cpu()
    rps = await measure(serve_bare, wrk_script(ctx.tmp), args)
    return (_own_cpu() - before) / (rps * ctx.duration) * 1e6


def _spy(pid: int, out: Path | None) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not Path(spy).exists():
        return None
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "250",
        "--nonblocking",
        "-o",
        str(out),
    ]
    command += os.environ.get("FERRY_BENCH_SPY_ARGS", "").split()  # e.g. "--gil", "--native"
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _unspy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Pipeline(Protocol):
    """A process taking the bench's webhooks and delivering them: the daemon (`Ferry`) or the
    design's floor (`bench.skeleton.Skeleton`)."""

    folder: Path

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def cpu_seconds(self) -> float: ...

    def thread_cpu(self) -> tuple[float, float, int]: ...

    def accepted(self) -> int: ...


async def per_event_cpu_us(
    ctx: Context,
    ferry: Pipeline,
    count: int,
    profile: Path | None,
    detail: dict[str, list[float]] | None = None,
    name: str = "per-event",
) -> float | None:
    """The per-event pipeline's CPU per delivered event, over `count` more events.

    `detail`: where to append, per delivered event, the CPU of the threads other than the event
    loop's (`others`: the store's writer thread, mostly) and the context switches (`switches`).
    `name`: the pipeline's, in an anomaly (events stored but not received once, or received more)."""
    await ctx.receiver.reset()
    threads_before = ferry.thread_cpu()
    before = ferry.cpu_seconds()
    spy = _spy(ferry.pid, profile)
    try:
        accepted_before = ferry.accepted()
        await post_count(ferry.url, ferry.folder, count, limit_s=60)
        await trio.sleep(0.2)
        accepted = ferry.accepted() - accepted_before
        await ctx.receiver.wait_items(accepted, max(20.0, accepted / 400))
        used = ferry.cpu_seconds() - before
        threads_after = ferry.thread_cpu()
    finally:
        _unspy(spy)
    stats = await ctx.receiver.stats()
    if detail is not None and stats["items"]:
        items = stats["items"]
        detail.setdefault("others", []).append((threads_after[1] - threads_before[1]) / items * 1e6)
        detail.setdefault("switches", []).append((threads_after[2] - threads_before[2]) / items)
    if stats["items"] < accepted:  # a slow round: let its backlog drain, or it counts in the next one's
        await ctx.receiver.wait_items(accepted, 120)
        late = await ctx.receiver.stats()
        if late["items"] < accepted:
            ctx.anomalies.append(f"{name}: stored {accepted}, received {late['items']}")
    elif stats["items"] > accepted:
        ctx.anomalies.append(f"{name}: stored {accepted}, received {stats['items']}")
    if stats["distinct_keys"] < stats["requests"]:
        ctx.anomalies.append(
            f"{name}: {stats['requests']} requests, {stats['distinct_keys']} idempotency keys"
        )
    return used / stats["items"] * 1e6 if stats["items"] else None


async def pipeline_cpu_us(
    ctx: Context,
    ferry: Pipeline,
    profile: Path | None,
    detail: dict[str, list[float]] | None = None,
    name: str = "pipeline",
) -> float | None:
    """The batching pipeline's CPU over a timed wrk load, per event stored during it.

    `detail`: where to append the CPU of the threads other than the event loop's over the load,
    per stored event (`others`). `name`: the pipeline's, in an anomaly (events stored but not
    received, or received more)."""
    await ctx.receiver.reset()
    before_events, before, threads_before = ferry.accepted(), ferry.cpu_seconds(), ferry.thread_cpu()
    spy = _spy(ferry.pid, profile)
    try:
        await post_load(ferry.url, wrk_script(ctx.tmp), duration=ctx.duration)
        used = ferry.cpu_seconds() - before
        threads_after = ferry.thread_cpu()
    finally:
        _unspy(spy)
    await trio.sleep(0.2)
    stored = ferry.accepted() - before_events
    if detail is not None and stored:
        detail.setdefault("others", []).append((threads_after[1] - threads_before[1]) / stored * 1e6)
    stats = await ctx.receiver.wait_items(stored, 30)
    if stats["items"] != stored:
        ctx.anomalies.append(f"{name}: stored {stored}, received {stats['items']}")
    return used / stored * 1e6 if stored else None


def _daemons(ctx: Context, name: str, tree: Path | None) -> tuple[Ferry, Ferry]:
    """(per-event daemon, pipeline daemon) of one tree."""
    per_folder, pipe_folder = ctx.tmp / f"cpu-per-event{name}", ctx.tmp / f"cpu-pipeline{name}"
    per_event = Ferry.start(
        per_folder,
        write_config(per_folder, ctx.receiver.url + "/event", batch=False, concurrency=CONCURRENCY),
        ctx.running,
        tree,
    )
    pipeline = Ferry.start(
        pipe_folder, write_config(pipe_folder, ctx.receiver.url + "/batch", batch=True), ctx.running, tree
    )
    return per_event, pipeline


BASELINE = " (baseline tree)"


async def cpu_figures(
    ctx: Context, rounds: int | None = None, profile: Path | None = None, baseline: Path | None = None
) -> None:
    """Appends issue 16's CPU rows to `ctx.rows`, their samples to `ctx.details["cpu"]`.

    `baseline`: another source tree (e.g. `git archive main | tar -x -C /tmp/base`) whose daemons
    run beside this tree's in every round, loads alternating: a before/after in one run.
    """
    rounds = rounds or ctx.rounds
    count = 3000 if ctx.quick else 10_000
    daemons = {"": _daemons(ctx, "", None)}
    if baseline is not None:
        daemons[BASELINE] = _daemons(ctx, "-baseline", baseline)
    skeleton = Skeleton(ctx.tmp / "cpu-skeleton", ctx.receiver.url + "/skeleton")
    batching = Skeleton(ctx.tmp / "cpu-skeleton-batch", ctx.receiver.url + "/batch", batch=True)
    try:
        samples = await _rounds(ctx, rounds, count, daemons, skeleton, batching)
        if profile is not None:  # a round of its own: the sampler's pauses are in no figure
            await trio.Path(profile).mkdir(parents=True, exist_ok=True)
            for label, (per_event, pipeline) in daemons.items():
                name = "-baseline" if label else ""
                await per_event_cpu_us(ctx, per_event, count, profile / f"per_event{name}.raw")
                await pipeline_cpu_us(ctx, pipeline, profile / f"pipeline{name}.raw")
            await per_event_cpu_us(ctx, skeleton, count, profile / "skeleton.raw", name="skeleton")
            await pipeline_cpu_us(ctx, batching, profile / "skeleton_pipeline.raw", name="skeleton --batch")
    finally:
        skeleton.stop()
        batching.stop()
    for per_event, pipeline in daemons.values():
        per_event.stop()
        pipeline.stop()
    floor = floor_measure(*((2_000, 3) if ctx.quick else (10_000, 3)))
    samples["floor"] = [sum(floor.values())]
    ctx.details["cpu"] = samples
    ctx.details["cpu_floor"] = floor
    for label in daemons:
        ctx.rows.extend(rows(samples, label))


async def _rounds(
    ctx: Context,
    rounds: int,
    count: int,
    daemons: dict[str, tuple[Ferry, Ferry]],
    skeleton: Skeleton,
    batching: Skeleton,
) -> dict[str, list[float]]:
    """The samples of `rounds` rounds, each running every load once (module docstring)."""
    samples: dict[str, list[float]] = {"bare": [], "client": [], "skeleton": []}
    for label in daemons:
        samples[f"per_event{label}"], samples[f"pipeline{label}"] = [], []
    samples["skeleton_pipeline"] = []
    for _ in range(rounds):
        samples["bare"].append(await bare_cpu_us(ctx))
        samples["client"].append(await client_cpu_us(ctx))
        for label, (per_event, _) in daemons.items():
            detail: dict[str, list[float]] = {}
            value = await per_event_cpu_us(ctx, per_event, count, None, detail)
            if value is not None:
                samples[f"per_event{label}"].append(value)
                for key, values in detail.items():
                    samples.setdefault(f"per_event_{key}{label}", []).extend(values)
        detail = {}
        value = await per_event_cpu_us(ctx, skeleton, count, None, detail, name="skeleton")
        if value is not None:
            samples["skeleton"].append(value)
            for key, values in detail.items():
                samples.setdefault(f"skeleton_{key}", []).extend(values)
        for label, (_, pipeline) in daemons.items():
            detail = {}
            value = await pipeline_cpu_us(ctx, pipeline, None, detail)
            if value is not None:
                samples[f"pipeline{label}"].append(value)
                samples.setdefault(f"pipeline_others{label}", []).extend(detail.get("others", []))
        detail = {}
        value = await pipeline_cpu_us(ctx, batching, None, detail, name="skeleton --batch")
        if value is not None:
            samples["skeleton_pipeline"].append(value)
            samples.setdefault("skeleton_pipeline_others", []).extend(detail.get("others", []))
        print("  round: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items() if v), flush=True)
    return samples


def _median(samples: dict[str, list[float]], key: str) -> float | None:
    values = samples.get(key)
    return statistics.median(values) if values else None


def _x_bare(
    figure: str, value: float | None, bare: float | None, target: str = "", passed: bool | None = None
) -> Row:
    """A row in us with its ratio to the bare server's CPU per request."""
    ratio = value / bare if value and bare else None
    return Row(figure, value, "us", bare, ratio, target, passed, baseline_unit="us bare")


def rows(samples: dict[str, list[float]], label: str = "") -> list[Row]:
    """The figures of issue 16 from the rounds' samples (medians); `label` names a baseline tree."""
    bare, client = _median(samples, "bare"), _median(samples, "client")
    per, pipe = _median(samples, f"per_event{label}"), _median(samples, f"pipeline{label}")
    floor = samples["floor"][0] if samples.get("floor") else None
    least = bare + client + floor if bare and client and floor else None
    skeleton, skeleton_pipe = _median(samples, "skeleton"), _median(samples, "skeleton_pipeline")
    ours = [
        Row("bare trio+h11 server: CPU per request (median)", bare, "us"),
        _x_bare(f"  LeanClient, {CONCURRENCY} tasks, alone: CPU per request (median)", client, bare),
        Row("  pipeline floor per event (jq + store bookkeeping, bench/floor.py)", floor, "us"),
        _x_bare("  least a per-event delivery can cost: bare server + client + floor", least, bare),
    ]
    design = [
        _x_bare(
            "the design's floor: listener + store + transform + sink as bare trio tasks "
            "(bench/skeleton.py): CPU per delivered event",
            skeleton,
            bare,
        ),
        _x_bare(
            "  of which threads beside the event loop (the store's writer, mostly)",
            _median(samples, "skeleton_others"),
            bare,
        ),
        Row("  context switches per delivered event, all threads", _median(samples, "skeleton_switches"), ""),
        Row(
            "  the daemon's per-event CPU over the design's floor's",
            per / skeleton if per and skeleton else None,
            "x",
        ),
    ]
    pipeline_design = [
        Row(
            "the design's floor for pipeline ingest (bench/skeleton.py --batch): CPU per stored event, "
            "bare / it",
            skeleton_pipe,
            "us",
            bare,
            bare / skeleton_pipe if skeleton_pipe and bare else None,
            baseline_unit="us bare",
        ),
        _x_bare(
            "  of which threads beside the event loop (the store's writer, mostly)",
            _median(samples, "skeleton_pipeline_others"),
            bare,
        ),
        Row(
            "  pipeline daemon over the design's floor",
            pipe / skeleton_pipe if pipe and skeleton_pipe else None,
            "x",
        ),
    ]
    return [
        *([] if label else ours),
        _x_bare(
            f"per-event delivery (sink concurrency {CONCURRENCY}): daemon CPU per delivered event{label}",
            per,
            bare,
            target=f"<= {PER_EVENT_TARGET:g}x bare",
            passed=per is not None and bare is not None and per / bare <= PER_EVENT_TARGET,
        ),
        _x_bare(
            f"  of which threads beside the event loop (the store's writer, mostly){label}",
            _median(samples, f"per_event_others{label}"),
            bare,
        ),
        Row(
            f"  context switches per delivered event, all threads{label}",
            _median(samples, f"per_event_switches{label}"),
            "",
        ),
        *([] if label else design),
        Row(
            f"pipeline ingest (batching sink): daemon CPU per stored event, bare / it{label}",
            pipe,
            "us",
            bare,
            bare / pipe if pipe and bare else None,
            f">= {PIPELINE_TARGET_RATIO:g}x ({PIPELINE_TARGET_US:g} us at 87 us bare)",
            pipe is not None and bare is not None and bare / pipe >= PIPELINE_TARGET_RATIO,
            baseline_unit="us bare",
        ),
        _x_bare(
            f"  of which threads beside the event loop (the store's writer, mostly){label}",
            _median(samples, f"pipeline_others{label}"),
            bare,
        ),
        *([] if label else pipeline_design),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, shorter loads")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the daemons into this folder")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another source tree to measure beside this one"
    )
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context(args.quick, prefix="ferry-bench-cpu-") as ctx:
        trio.run(cpu_figures, ctx, args.rounds, args.profile, args.baseline)
    return report(ctx)


if __name__ == "__main__":
    sys.exit(main())
