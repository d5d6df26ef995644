"""What the control socket takes from a client's request line before it trusts it (pure).

Guarantees: never raises on any input (garbage, JSON nested too deeply, non-objects), and never
quotes more than 80 characters of what the client sent back into an answer.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msgspec


def shown(value: Any) -> str:
    """A client's value quoted in an error: a scalar's repr (cut at 80 characters), else its kind."""
    if isinstance(value, dict | list):
        return f"(a JSON {'object' if isinstance(value, dict) else 'array'})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def asked_command(line: bytes, commands: Container[str]) -> str | None:
    """The known command a request line names, if any (for the audit row of a refused peer)."""
    try:
        raw = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    asked = raw.get("cmd") if isinstance(raw, dict) else None
    return asked if isinstance(asked, str) and asked in commands else None
