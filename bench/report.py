"""The benchmark's one table: printed, and written as JSON to `bench/out/latest.json`."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

OUT = Path(__file__).resolve().parent / "out" / "latest.json"


@dataclass
class Row:
    """One figure: its value, what it is compared with, and whether it meets its target."""

    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None  # None: no target, reported for information
    baseline_unit: str | None = None  # when not `unit`
    ratio_unit: str = "x"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s" and abs(value) < 100:
        return f"{value:.2f} s"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def render(rows: list[Row]) -> str:
    """The table as Markdown (readable as plain text too)."""
    header = ("figure", "value", "baseline", "ratio", "target", "result")
    lines = [
        (
            row.figure,
            _number(row.value, row.unit),
            _number(row.baseline, row.baseline_unit or row.unit),
            _number(row.ratio, row.ratio_unit),
            row.target or "-",
            {True: "PASS", False: "FAIL", None: "info"}[row.passed],
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [cell.ljust(w) if i in (0, 4) else cell.rjust(w) for i, (cell, w) in pairs]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i not in (0, 4) else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(cells) for cells in lines)])


def write(rows: list[Row], details: dict[str, Any], settings: dict[str, Any], path: Path = OUT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine(),
        "settings": settings,
        "rows": [asdict(row) for row in rows],
        "details": details,
        "passed": all(row.passed is not False for row in rows),
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    return path
