"""What every webhook verifier answers: `Verified` (with its replay key) or `Unverified`, and the
helpers the schemes share.

Apart from `verify.py` so that a scheme in its own module (`verify_jwt.py`, loaded only when a
source uses it) can use them without importing the module that dispatches to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

Headers = Sequence[tuple[bytes, bytes]]
"""A request head as h11 gives it: lower-cased names, raw values."""


class Unverified(Exception):
    """A request failed verification; `reason` is the metric label, `message` the 401's text."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Verified:
    """A request that passed; `replay_key` is None when replays are not checked."""

    replay_key: str | None = None
    replay_until: float = 0.0


PASSED: Final = Verified()


class Verifier(Protocol):
    """One source's check. `needs_body`: False when the head alone decides (checked before the body)."""

    needs_body: bool
    challenge: bytes | None
    """`WWW-Authenticate` value sent with a 401, if the scheme has one."""

    def check(self, headers: Headers, body: bytes, now: float) -> Verified: ...


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def replay_key(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(b"%d:" % len(part))
        hasher.update(part)
    return hasher.hexdigest()[:40]
