"""The building blocks every config module shares: the frozen section base and name rules.

Feature modules (`config_poll`, `config_security`, …) define their tables on these and
`daemon.config` assembles them into the whole `Config`, so no feature has to grow one file.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta, Struct

T = TypeVar("T")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
ComponentName = Annotated[str, Meta(pattern=NAME_RE)]


def default(value: T) -> T:
    """`value` as a field default, given through a factory.

    msgspec's JSON Schema generator cannot encode a `Duration`, a `Size` or a section holding them
    as a `"default"`; factory defaults it leaves out (the generated docs still show them).
    """
    return msgspec.field(default_factory=lambda: value)


class Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table: frozen, unknown keys rejected."""
