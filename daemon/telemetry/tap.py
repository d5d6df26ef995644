"""Taps: live copies of the events passing a component, for `ferry ctl tap NAME`.

Hook points (each after its commit, so a tapped event is a stored one):
    - a source: the ingest batcher, once the event is committed (`source` records);
    - a transform: the transformer, once its outputs are committed (`transform` records,
      including `dead` ones that jq refused);
    - a sink: the sink, once an attempt's outcomes are committed (`sink` records: delivery
      id, attempt, outcome, status, error).

Cost:
    With nobody tapping a component, a hook costs one dict lookup (`taps.taps.get(name)`).
    Each running daemon has its own `Taps` (`Running.taps`), handed to its actors at construction
    (`daemon.component.Deps`); an actor built without one gets a private one nobody subscribes to.
    While tapped, a hook puts a raw record (bytes, ids) into each subscriber's bounded buffer
    with `send_nowait`; decoding, masking and encoding happen in the subscriber's own task.

Lossy by design:
    A tap never slows the pipeline: when a subscriber's buffer is full (its client reads
    slower than events pass), the record is dropped and counted in `Tap.dropped`, and the
    client is told the running count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, final

import trio

DEFAULT_BUFFER: Final = 1024


class Record(NamedTuple):
    """One raw tapped event, as a hook hands it over (formatted later by the subscriber)."""

    kind: str  # source | transform | sink
    event_id: str
    payload: bytes | None
    at: float
    extra: dict[str, Any] | None = None


@final
@dataclass(eq=False)
class Tap:
    """One subscriber: a bounded buffer of records and the number dropped because it was full."""

    name: str
    send: trio.MemorySendChannel[Record]
    receive: trio.MemoryReceiveChannel[Record]
    dropped: int = 0

    def offer(self, record: Record) -> None:
        try:
            self.send.send_nowait(record)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@final
@dataclass
class Taps:
    """Every live tap by component name; see the module docstring."""

    taps: dict[str, list[Tap]] = field(default_factory=dict)

    def publish(self, name: str, record: Record) -> None:
        """Offer `record` to every tap on `name` (callers first check `taps.get(name)`)."""
        for tap in self.taps.get(name, ()):
            tap.offer(record)

    @contextmanager
    def subscribe(self, name: str, buffer: int = DEFAULT_BUFFER) -> Iterator[Tap]:
        """A tap on `name` for the duration of the `with` block."""
        send, receive = trio.open_memory_channel[Record](buffer)
        tap = Tap(name, send, receive)
        self.taps.setdefault(name, []).append(tap)
        try:
            yield tap
        finally:
            taps = self.taps.get(name, [])
            if tap in taps:
                taps.remove(tap)
            if not taps:
                self.taps.pop(name, None)
            send.close()
            receive.close()
