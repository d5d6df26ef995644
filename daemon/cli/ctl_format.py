"""How `ferry ctl` writes things for people: aligned tables, UTC times, durations, shortened texts.

Shared by `ctl.py` and the `ctl_*` command modules (which `ctl.py` imports, so they cannot
import these from it).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, TextIO


def table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) if c is not None else "" for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)] if cells else []
    if not cells:
        widths = [len(h) for h in header]
    for row in [list(header), *cells]:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def ago(at: float | None) -> str:
    """A stored Unix time in UTC; one beyond the calendar (year 9999) is shown as its number."""
    if at is None:
        return ""
    try:
        return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"{at!r} (out of range)"


def uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h{minutes}m"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
