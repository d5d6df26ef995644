"""The listener's checks at the door: JSON nesting, message framing, and protocol-error logging.

Pure parts of `actors.webhook`, kept apart so that module stays readable.

- `too_deep(body, limit)`: whether a body nests arrays/objects deeper than `limit`, decided on
  the bytes *before* the body is decoded (msgspec, jq, masking and jsonschema all recurse, so a
  deep body must never reach them). Cost: two `bytes.count` calls when the body holds at most
  `limit` brackets (the common small webhook); otherwise strings are cut out with one regex and
  the brackets peeled one level per pass (`bytes.replace`, at most `limit` passes), all in C.
- `framing_error(headers)`: a request whose body length is ambiguous (RFC 9112 §6.1: both
  `Content-Length` and `Transfer-Encoding`) — h11 would silently follow `Transfer-Encoding`,
  which is how request smuggling through a proxy works; it must be refused and the connection
  closed.
- `ProtocolErrors`: counts protocol errors (`ferry.listener.protocol_errors{kind}`) and logs
  them at a bounded rate — at most one line per `interval` seconds, which names how many were
  left out since the last one — and never with a traceback: an unauthenticated peer must not be
  able to fill the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Final, final

from daemon.telemetry import metrics

__all__ = ["ProtocolErrors", "framing_error", "too_deep"]

_STRINGS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A JSON string, escapes included (unrolled: no per-character alternation)."""
_AS_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(sorted(set(range(256)) - set(b"[]{}")))


def too_deep(body: bytes, limit: int) -> bool:
    """True if `body` (JSON) nests arrays and objects more than `limit` levels deep.

    Brackets inside strings do not count. Exact for valid JSON; for a body that is not JSON
    the answer is only a hint (the decoder then refuses it on its own). `[]` and `{}` are one
    level each, so `[[1]]` is 2 levels and a scalar 0.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRINGS.sub(b"", body).translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")  # removes every innermost pair: one level per pass
    return bool(brackets)


def framing_error(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why a request's body length is ambiguous (it must then be refused and its connection
    closed), or None. h11 lower-cases header names."""
    length = chunked = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            chunked = True
    if length and chunked:
        return "request has both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)"
    return None


@final
class ProtocolErrors:
    """Counts and logs the listener's protocol errors, one log line per `interval` at most.

    `note(kind, detail)`: count one (metric `ferry.listener.protocol_errors{kind}`, and
    `total`); log `detail` if the last line was more than `interval` seconds ago, saying how
    many were suppressed since; otherwise only count it. `clock` is injectable for tests.
    """

    def __init__(self, log: logging.Logger, interval: float, clock: Callable[[], float]) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0
        self.total = 0

    def __repr__(self) -> str:
        return f"<ProtocolErrors [total: {self.total}, suppressed: {self._suppressed}]>"

    def note(self, kind: str, detail: str) -> None:
        self.total += 1
        metrics.current().protocol_errors.add(1, {"kind": kind})
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        self._log.warning(
            "webhook listener: %s (%s)%s",
            detail,
            kind,
            f"; {suppressed} more since the last such line" if suppressed else "",
            extra={"fields": {"kind": kind, "suppressed": suppressed}},
        )
