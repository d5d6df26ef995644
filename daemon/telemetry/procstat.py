"""The daemon process's own resource use, read from the kernel when a metric reader asks.

CPU time comes from `os.times()` (user and system, children excluded), resident memory from
`/proc/self/statm` (falling back to the peak from `getrusage` where there is no /proc), open
file descriptors from the entries of `/proc/self/fd` (None where there is no /proc). Each read
is a few system calls, done only at collection time (every metrics interval, every scrape
of `/metrics`, every alert evaluation), never per event.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Final

__all__ = ["cpu_seconds", "open_fds", "rss_bytes"]

_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM: Final = Path("/proc/self/statm")
_FDS: Final = Path("/proc/self/fd")


def cpu_seconds() -> dict[str, float]:
    """CPU time used so far by this process, by mode (`user`, `system`)."""
    times = os.times()
    return {"user": times.user, "system": times.system}


def rss_bytes() -> int:
    """Resident set size now (the peak where /proc is missing)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def open_fds() -> int | None:
    """File descriptors open now (None where /proc is missing)."""
    try:
        # listing the folder opens one more descriptor, which is counted too
        return max(0, len(os.listdir(_FDS)) - 1)
    except OSError:
        return None
