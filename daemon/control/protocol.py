"""The control protocol (version 1): the typed requests `ferry ctl` sends and the answers it gets.

One request per line, a JSON object `{"v": 1, "cmd": "status", ...}` decoded into one of the
`Request` structs; one final answer per request, `Ok` or `Failed`, possibly after `Progress`
lines (`drain`, `replay`, `tap`). `Answer` is any of them as a client decodes it. The socket that
carries them, and who may use it, is `daemon.control.server`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta, Struct

from daemon.errors import StoreUnavailable

T = TypeVar("T")

VERSION: Final = 1
MAX_LINE: Final = 64 * 1024


# -- requests --------------------------------------------------------------------------------


class _Request(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="cmd"):
    v: int = VERSION


Limit = Annotated[int, Meta(ge=1, le=10_000)]
Seconds = Annotated[float, Meta(ge=0)]


class StatusRequest(_Request, frozen=True, tag="status"):
    """Version, uptime, config, actors, queue depths, paused components."""


class PauseRequest(_Request, frozen=True, tag="pause"):
    """Pause a webhook source (it answers 503 + Retry-After) or a sink (it stops fetching)."""

    name: str


class ResumeRequest(_Request, frozen=True, tag="resume"):
    """Undo `pause`."""

    name: str


class _DeadSelection(_Request, frozen=True):
    sink: str | None = None
    since: Seconds | None = None
    error: str | None = None


class DlqListRequest(_DeadSelection, frozen=True, tag="dlq.list"):
    """Dead letters, newest first."""

    limit: Limit = 50


class DlqShowRequest(_Request, frozen=True, tag="dlq.show"):
    """One delivery with its payload."""

    id: str


class DlqRetryRequest(_DeadSelection, frozen=True, tag="dlq.retry"):
    """Make dead letters pending again: `ids`, or every one matching the filters with `all`."""

    ids: list[str] = []
    all: bool = False


class DlqPurgeRequest(_DeadSelection, frozen=True, tag="dlq.purge"):
    """Delete dead letters: `ids`, or every one matching the filters with `all`; `dry_run` counts."""

    ids: list[str] = []
    all: bool = False
    dry_run: bool = False


class EventRequest(_Request, frozen=True, tag="event"):
    """One event, the events derived from it, and each one's delivery outcomes."""

    id: Annotated[str, Meta(min_length=1, max_length=300)]


class StatsRequest(_Request, frozen=True, tag="stats"):
    """Counts by outcome per stage and failures by last status."""


class AuditRequest(_Request, frozen=True, tag="audit"):
    """The newest audit rows."""

    limit: Limit = 20


class TapRequest(_Request, frozen=True, tag="tap"):
    """Stream the events passing a source, transform or sink (masked) as progress lines.

    Ends after `limit` events, after `timeout` seconds, or when the client goes away.
    """

    name: str
    limit: Annotated[int, Meta(ge=1)] | None = None
    buffer: Annotated[int, Meta(ge=1, le=100_000)] = 1024
    timeout: Seconds = 7 * 86400.0


class ReloadRequest(_Request, frozen=True, tag="reload"):
    """Re-read the config file and apply it; a bad file changes nothing and its errors are returned."""


class DrainRequest(_Request, frozen=True, tag="drain"):
    """Stop intake, deliver what is due within `timeout`, then stop the daemon (exit 0)."""

    timeout: Seconds = 60.0


class ReplayRequest(_Request, frozen=True, tag="replay"):
    """New deliveries of `source`'s stored events received in [`since`, `until`) (Unix times),
    and of the transform outputs derived from them, to every sink downstream of it or to `to`."""

    source: str
    since: float | None = None
    until: float | None = None
    to: str | None = None


class AlertsRequest(_Request, frozen=True, tag="alerts"):
    """Every alert rule's state: firing, pending or ok, since when, its value, who was told."""


Request = (
    StatusRequest
    | PauseRequest
    | ResumeRequest
    | DlqListRequest
    | DlqShowRequest
    | DlqRetryRequest
    | DlqPurgeRequest
    | EventRequest
    | StatsRequest
    | AuditRequest
    | DrainRequest
    | ReloadRequest
    | ReplayRequest
    | TapRequest
    | AlertsRequest
)
COMMANDS: Final[Mapping[str, type[Any]]] = {cls.__struct_config__.tag: cls for cls in Request.__args__}
MUTATING: Final = frozenset({"pause", "resume", "dlq.retry", "dlq.purge", "drain", "reload", "replay"})


# -- answers ---------------------------------------------------------------------------------


class Ok(Struct, frozen=True):
    result: Any
    v: int = VERSION
    ok: bool = True


class Failed(Struct, frozen=True):
    error: str
    v: int = VERSION
    ok: bool = False


class Progress(Struct, frozen=True):
    progress: Any
    v: int = VERSION
    ok: bool = True


class Answer(Struct, frozen=True):
    """Any line the daemon sends, as a client decodes it."""

    v: int
    ok: bool
    result: Any = None
    error: str | None = None
    progress: Any = None


class CommandError(Exception):
    """A command was refused or failed; its message is the error answer."""


async def answered(operation: Awaitable[T]) -> T:
    """Await a store operation for a command: a store outage becomes the command's error answer."""
    try:
        return await operation
    except StoreUnavailable as exc:
        raise CommandError(str(exc)) from None


_encode = msgspec.json.Encoder().encode


def encode_line(message: Struct) -> bytes:
    return _encode(message) + b"\n"
