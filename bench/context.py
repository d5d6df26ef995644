"""The state of one benchmark run, shared by every case."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Ferry
from bench.receiver import Receiver
from bench.report import Row, render


@dataclass
class Context:
    """One benchmark run: its settings, its receiver, its daemons (for cleanup) and what it found."""

    quick: bool
    tmp: Path
    receiver: Receiver
    running: list[Ferry] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    memory: list[Row] = field(default_factory=list)  # peak RSS rows, shown last
    anomalies: list[str] = field(default_factory=list)  # duplicates, losses, errors: reported, not hidden
    loadavg_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @property
    def duration(self) -> int:
        """Seconds of each timed wrk load."""
        return 2 if self.quick else 5

    @property
    def rounds(self) -> int:
        return 1 if self.quick else 3

    def settings(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "wrk": f"-t2 -c50 -d{self.duration}s",
            "rounds": self.rounds,
            "loadavg_at_start": self.loadavg_at_start,
            "loadavg_at_end": os.getloadavg(),
        }

    def rss_row(self, case: str, ferry: Ferry) -> float | None:
        peak = ferry.peak_rss_mib()
        self.memory.append(Row(f"daemon peak RSS (VmHWM): {case}", peak, "MiB"))
        return peak


@contextmanager
def bench_context(quick: bool, *, prefix: str = "ferry-bench-", receiver: bool = True) -> Iterator[Context]:
    """A run's `Context` in a temporary folder, with a receiver unless told not to; on the way
    out (also on failure or Ctrl-C) every daemon it started is stopped and the receiver closed."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        sink = Receiver() if receiver else None
        ctx = Context(quick, Path(folder), sink)  # type: ignore[arg-type]  # None: a case without a sink
        try:
            yield ctx
        finally:
            for ferry in ctx.running:
                ferry.stop()
            if sink is not None:
                sink.close()


def report(ctx: Context, rows: list[Row] | None = None) -> int:
    """Print `rows` (the run's rows by default) and its anomalies; the exit status their targets give."""
    rows = ctx.rows if rows is None else rows
    print(render(rows))
    for anomaly in ctx.anomalies:
        print(f"ANOMALY: {anomaly}")
    return 0 if all(row.passed is not False for row in rows) else 1
