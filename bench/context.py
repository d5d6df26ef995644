"""The state of one benchmark run, shared by every case."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Ferry
from bench.receiver import Receiver
from bench.report import Row


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
