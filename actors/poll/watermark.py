"""The high-water mark of a poll source: parsing an item's mark, ordering marks, moving one back.

Pure, like `actors/poll/pages.py`, and apart from it so that the poll config can check a
`since.initial` value without importing the page reader (which imports the config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, final

import msgspec

from daemon.errors import PollError

_encode = msgspec.json.Encoder().encode


def key_text(value: Any) -> str | None:
    """An item's key or mark as text: strings as they are, integral floats without `.0`, the rest as JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return _encode(value).decode()


@final
@dataclass(frozen=True, slots=True)
class Watermark:
    """A high-water mark as the API wrote it (`text`) and as ferry orders it (`order`)."""

    text: str
    order: float

    @staticmethod
    def parse(value: Any, format: str) -> Watermark | None:
        """The mark an item's field gives, or None if it is not a value of `format`."""
        order = _order(value, format)
        if order is None:
            return None
        return Watermark(value if isinstance(value, str) else key_text(value) or "", order)

    def minus(self, overlap: float, format: str) -> str:
        """The mark moved `overlap` seconds back, written as the API writes it."""
        if overlap <= 0:
            return self.text
        if format == "rfc3339":
            when = datetime.fromisoformat(self.text)
            zone = when.tzinfo
            moved = (when if zone is not None else when.replace(tzinfo=UTC)) - timedelta(seconds=overlap)
            if zone is None:
                return moved.replace(tzinfo=None).isoformat()
            text = moved.isoformat()
            return text[:-6] + "Z" if text.endswith("+00:00") and self.text.endswith(("Z", "z")) else text
        value = self.order - overlap
        number = value * 1000 if format == "unix_ms" else value
        return str(int(number)) if float(number).is_integer() else repr(number)

    @staticmethod
    def highest(marks: list[Any], format: str, current: Watermark | None) -> Watermark | None:
        """The highest of `current` and the marks of a page; items without a mark are left out.

        Raises `PollError` (`bad_mark`) for a mark that is present but not a `format` value:
        guessing would move the mark somewhere the API never said.
        """
        best, best_order = None, current.order if current is not None else -math.inf
        parsed: dict[str, float | None] = {}  # items often share a mark: each text is parsed once
        for index, value in enumerate(marks):
            if value is None:
                continue
            if type(value) is not str:
                order = _order(value, format)
            elif value in parsed:
                order = parsed[value]
            else:
                order = parsed[value] = _order(value, format)
            if order is None:
                raise PollError(
                    f"item {index}: `since.field` gave {value!r}, not a {format} value", kind="bad_mark"
                )
            if order > best_order:
                best, best_order = value, order
        if best is None:
            return current
        return Watermark(best if isinstance(best, str) else key_text(best) or "", best_order)


def _order(value: Any, format: str) -> float | None:
    """The instant a mark stands for, in Unix seconds (None: not a `format` value)."""
    if format == "rfc3339":
        if not isinstance(value, str):
            return None
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        return None
    if not math.isfinite(number):
        return None
    return number / 1000 if format == "unix_ms" else number
