"""JSON logs: one object a line on stderr, masked and scrubbed by the config's redactor.

Log calls pass their fields as `extra={"fields": {...}}` (an event's JSON, if any, as
`payload`: `[telemetry] mask` paths apply from its root); each line carries `ts`,
`level`, `logger`, `msg`, those fields, `trace_id`/`span_id` when emitted inside a
span, and for errors `traceback`. The SDK's own warnings (a collector that is down) go
through the same format, each distinct message once: again only after an export has
succeeded since (the collector came back and went away again), or as an hourly reminder
while the collector stays away.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any, Final, final

import msgspec
from opentelemetry import trace

from daemon.telemetry.masking import Redactor

_encoder = msgspec.json.Encoder()
_SDK_LOG_EVERY_S: Final = 3600.0


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line, with the current span's ids when there is one.

    With a `redactor`, the record's fields are masked (`[telemetry] mask`) and configured
    secrets are scrubbed from the message, the fields and the traceback.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor if redactor is not None and (redactor.rules or redactor.secrets) else None

    def format(self, record: logging.LogRecord) -> str:
        redactor = self._redactor
        message = record.getMessage()
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message if redactor is None else redactor.scrub(message),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = f"{span_context.trace_id:032x}"
            line["span_id"] = f"{span_context.span_id:016x}"
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields if redactor is None else _redact_fields(redactor, fields))
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(record.exc_info[1])).rstrip()
            line["traceback"] = text if redactor is None else redactor.scrub(text)
        return _encoder.encode(line).decode()


def _redact_fields(redactor: Redactor, fields: dict[str, Any]) -> Any:
    """Fields masked (bare names at any depth); a `payload` field is masked as a payload's root."""
    masked = redactor.mask(fields)
    if "payload" in fields:
        masked["payload"] = redactor.mask(fields["payload"])
    return masked


@final
class _OncePerInterval(logging.Filter):
    """Lets each distinct message template through once per `interval` seconds, or after `rearm()`.

    A collector that is down makes the SDK warn on every export (every few seconds, every
    metrics interval): the first warning is logged, the repeats are not until an export has
    succeeded (`rearm()`, called from the exporter threads) and one fails again.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[str, float] = {}

    def rearm(self) -> None:
        """An export succeeded: the next failure is news again."""
        if self._last:
            self._last = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            # a collector that is down is not an error of ferry's: the spans are counted as dropped
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        now = time.monotonic()
        key = str(record.msg)
        if now - self._last.get(key, -self._interval) < self._interval:
            return False
        self._last[key] = now
        return True


sdk_log_filter: Final = _OncePerInterval(_SDK_LOG_EVERY_S)
"""Filters the OTel SDK's own log lines; its exporters `rearm()` it after each successful export."""


def use_redactor(redactor: Redactor) -> None:
    """Scrub `redactor`'s secrets from every `ferry.*` line from now on (a reload read new ones)."""
    for handler in logging.getLogger("ferry").handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter(redactor))


def setup_logging(level: str = "info", redactor: Redactor | None = None) -> None:
    """Send every `ferry.*` log record (and the OTel SDK's warnings) to stderr as JSON lines.

    `redactor` masks payload fields and scrubs secrets from every `ferry.*` line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redactor))
    root = logging.getLogger("ferry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    sdk_handler = logging.StreamHandler(sys.stderr)
    sdk_handler.setFormatter(JsonFormatter())
    sdk_handler.addFilter(sdk_log_filter)
    sdk = logging.getLogger("opentelemetry")
    sdk.handlers[:] = [sdk_handler]
    sdk.setLevel(logging.WARNING)
    sdk.propagate = False
