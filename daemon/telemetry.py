"""Logs: one JSON object per line on stderr (journald-friendly), with structured fields.

Log calls pass their fields as `extra={"fields": {...}}`; each line carries
`ts`, `level`, `logger`, `msg`, those fields and, for errors, `traceback`.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            line["traceback"] = "".join(traceback.format_exception(record.exc_info[1])).rstrip()
        return _encoder.encode(line).decode()


def setup_logging(level: str = "info") -> None:
    """Send every `ferry.*` log record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("ferry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
