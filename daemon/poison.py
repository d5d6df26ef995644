"""Poison events: one event whose data makes a stage raise must not stop the stage.

Isolation:
    A stage runs its work on a whole batch (`bisect`). When that raises an isolable error (any
    `Exception` but the two below), the batch is split in halves and each half is run again,
    down to the single events that still raise: those are dead-lettered with the reason
    (`reason`: `poison: … raised RecursionError: …`) and every other event of the batch goes
    on. A batch with one bad event costs about 2·log2(size) runs instead of one.

Not isolated:
    `StoreError` (the store is unavailable: disk full, I/O error, stopping) says nothing about
    the data: it is waited out or ends the actor, and never dead-letters a good event.
    `MemoryError` is most often the process, not one event: it ends the actor like a bug
    would; should one event cause it again and again, the crash quarantine
    (`daemon.store.quarantine`) dead-letters that event after `[supervisor] quarantine_after` crashes.
    `trio.Cancelled` is a `BaseException` and is never caught.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from daemon.errors import StoreError

T = TypeVar("T")

REASON_CHARS: Final = 500
PREFIX: Final = "poison: "


def isolable(exc: BaseException) -> bool:
    """Whether `exc`, raised while handling some events, may be blamed on their data."""
    return isinstance(exc, Exception) and not isinstance(exc, StoreError | MemoryError)


def clean(text: str) -> str:
    """`text` as valid UTF-8 (lone surrogates from a decoded `"\\ud800"` replaced): storable."""
    return text.encode("utf-8", "replace").decode("utf-8")


def reason(what: str, exc: BaseException) -> str:
    """A dead letter's error for an event on which `what` raised `exc` (bounded, storable)."""
    message = " ".join(str(exc).split())
    text = f"{PREFIX}{what} raised {type(exc).__name__}" + (f": {message}" if message else "")
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 1] + "…"
    return clean(text)


async def bisect(
    items: Sequence[T],
    run: Callable[[Sequence[T]], Awaitable[None]],
    dead: Callable[[T, Exception], Awaitable[None]],
) -> int:
    """`run(items)`; on an isolable error, run each half again, down to single items, and
    `dead(item, error)` each item that still fails alone. Returns how many items died.

    `run` must be all-or-nothing (one store transaction): a failed run leaves nothing behind.
    Errors that are not isolable (see the module docstring) propagate.
    """
    try:
        await run(items)
    except Exception as exc:
        if not isolable(exc):
            raise
        if len(items) == 1:
            await dead(items[0], exc)
            return 1
        middle = len(items) // 2
        return await bisect(items[:middle], run, dead) + await bisect(items[middle:], run, dead)
    return 0
