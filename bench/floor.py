"""Case 2c: the least CPU the pipeline must add per event, and the ingest ratio that leaves at best.

    .venv/bin/python -m bench.floor [--quick]      # this case alone (without case 2's figures)

Case 2 measures durable ingest with the whole pipeline in one process against a bare h11
server. This case measures, in this process and by thread CPU time (so other work on the
machine hardly moves it), the work each event *must* cost once stored, with nothing of ferry's
orchestration (tasks, wake-ups, channels, metrics, logs, the HTTP request) around it:

- **jq**: the benchmark's map through `actors.transform.program.TransformProgram`, batches of 50
  (the batch size case 2's transformer sees under load);
- **transform bookkeeping**: `read_events` + `commit_transform` for those batches — reading the
  events, storing the outputs, their deliveries and the cursor — each batch its own
  `synchronous=FULL` transaction, as the writer thread runs them;
- **delivery bookkeeping**: `due_deliveries` + `record_outcomes` (delivered) per batch of 50.

Their sum is the pipeline's floor per event. With case 2's CPU per request of the bare server
and of the store-only daemon (same run), `bare / (store only + floor)` is the best ingest ratio
a one-process daemon with the pipeline can reach on this machine: if it is under the 0.75x
target, no trimming of ferry's own code can meet that target.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from actors.transform.config import TransformConfig
from actors.transform.program import TransformProgram
from bench.context import Context
from bench.harness import RESHAPE, SOURCE
from bench.listener_bench import BODY
from bench.report import Row, render
from daemon.store import outbox
from daemon.store.outbox import Derived, Incoming, Outcomes
from daemon.store.sqlite import open_connection

BATCH = 50
TARGET = 0.75


def _cpu_us_per_event(run: Callable[[], int], repeats: int) -> float:
    """Median over `repeats` of thread CPU time per event of `run()` (which returns its event count)."""
    samples = []
    for _ in range(repeats):
        started = time.thread_time()
        events = run()
        samples.append((time.thread_time() - started) / events * 1e6)
    return statistics.median(samples)


def measure(events: int, repeats: int) -> dict[str, float]:
    """µs of CPU per event of each floor component (module docstring)."""
    body = BODY.encode()
    program = TransformProgram(msgspec.convert({"inputs": [SOURCE], "map": RESHAPE}, TransformConfig))

    def jq() -> int:
        for _ in range(0, events, BATCH):
            program.map([body] * BATCH)
        return events

    with tempfile.TemporaryDirectory(prefix="ferry-floor-") as folder:
        conn = open_connection(Path(folder) / "floor.db", "full")
        incoming = [Incoming(SOURCE, body, None, ())] * BATCH
        position = 0

        def ingest() -> int:  # not part of the floor: stores the events the stages then read
            for _ in range(0, events, BATCH):
                conn.execute("BEGIN IMMEDIATE")
                outbox.insert_events(conn, incoming)
                conn.execute("COMMIT")
            return events

        def transform() -> int:
            nonlocal position
            done = 0
            while done < events:
                conn.execute("BEGIN IMMEDIATE")
                read = outbox.read_events(conn, [SOURCE], position, BATCH)
                position = read[-1].seq
                outputs = [Derived(event, 0, event.payload, None) for event in read]
                outbox.commit_transform(conn, "shape", position, outputs, [], ["out"])
                conn.execute("COMMIT")
                done += len(read)
            return done

        def deliver() -> int:
            done, now = 0, time.time() + 60
            while done < events:
                conn.execute("BEGIN IMMEDIATE")
                due = outbox.due_deliveries(conn, "out", now, BATCH)
                outbox.record_outcomes(conn, Outcomes([(row.rowid, 200) for row in due], [], []))
                conn.execute("COMMIT")
                done += len(due)
            return done

        figures = {"jq": _cpu_us_per_event(jq, repeats)}
        transforms, deliveries = [], []
        for _ in range(repeats):
            ingest()
            transforms.append(_cpu_us_per_event(transform, 1))
            deliveries.append(_cpu_us_per_event(deliver, 1))
        conn.close()
    figures["transform bookkeeping"] = statistics.median(transforms)
    figures["delivery bookkeeping"] = statistics.median(deliveries)
    return figures


def _size(quick: bool) -> tuple[int, int]:
    """(events, repeats) of a run."""
    return (5_000, 3) if quick else (20_000, 5)


def rows(figures: dict[str, float], bare_cpu: float | None, alone_cpu: float | None) -> list[Row]:
    """The floor's rows, and the ceiling they leave when case 2's CPU figures are known."""
    floor = sum(figures.values())
    out = [
        Row(f"  pipeline floor: {name}, per event (in-process CPU)", value, "us")
        for name, value in figures.items()
    ]
    out.append(Row("  pipeline floor per event, in all", floor, "us"))
    if bare_cpu and alone_cpu:
        ceiling = bare_cpu / (alone_cpu + floor)
        out.append(
            Row(
                "  best ingest ratio one process can reach: bare / (store only + floor)",
                ceiling,
                "x",
                target=f"{TARGET:g}x needs it >= {TARGET:g}",
            )
        )
    return out


async def pipeline_floor(ctx: Context) -> None:
    """`make bench` case 2c: appends its rows to `ctx.rows` (case 2's CPU figures, if it ran)."""
    cpu = ctx.details.get("durable_ingest", {}).get("cpu_us", {})
    figures = measure(*_size(ctx.quick))
    ctx.details["pipeline_floor"] = figures
    ctx.rows.extend(rows(figures, cpu.get("bare"), cpu.get("store_only")))


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    figures = measure(*_size(quick))
    print(render(rows(figures, None, None)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
