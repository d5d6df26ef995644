"""What each control command does to the running daemon; `ControlServer` hands requests here.

`Commands` dispatches a typed request to the module of its area and audits what changes
something; the areas are:

- `daemon.control.status`: `status`, `stats` (reads);
- `daemon.control.pausing`: `pause`, `resume`, `drain` (in-memory holds; drain stops the daemon);
- `daemon.control.dlq`: `dlq list|show|retry|purge`;
- `daemon.control.replay`: `replay`;
- `daemon.control.tap`: `tap` (live, lossy);
- `daemon.control.event`: `event` (one event's journey);
- `daemon.control.audit`: the audit trail (`audit` reads it);
- `alerts` answers the alerter's views; `reload` is `daemon.reload`.

Audit: see `daemon.control.audit`. A command that fails is recorded with its error, then answered.

Masking: `dlq list/show` payloads and error texts, `event`, `tap`, `status`'s errors and guards,
and the audit trail's arguments go through `[telemetry] mask` and the sinks' header secrets
(`daemon.telemetry.masking`), rebuilt from the current config after a reload.

Reload: see `daemon.reload`. A refused reload (an invalid file, a section that cannot change
live) is answered as an error listing every problem; nothing changed.

Errors: a refusal or a store outage (`StoreUnavailable`) is a `CommandError`, answered as an
error; the connection stays usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

import trio
from msgspec import Struct

from daemon.config.root import Config, LoadedConfig
from daemon.control import audit, dlq, event, pausing, replay, status, tap
from daemon.control.protocol import (
    MUTATING,
    AlertsRequest,
    AuditRequest,
    CommandError,
    DlqListRequest,
    DlqPurgeRequest,
    DlqRetryRequest,
    DlqShowRequest,
    DrainRequest,
    EventRequest,
    PauseRequest,
    ReloadRequest,
    ReplayRequest,
    ResumeRequest,
    StatsRequest,
    StatusRequest,
    TapRequest,
)
from daemon.control.server import Call, Peer
from daemon.registry import AlertView
from daemon.reload import ReloadResult, reload
from daemon.telemetry.masking import Redactor, config_redactor

if TYPE_CHECKING:
    from daemon.running import Running


class AlertsResult(Struct, frozen=True):
    alerts: list[AlertView]


@final
class Commands:
    """Answers control requests against one running daemon; see the module docstring.

    `wall` is the wall clock (deliveries due by it count for a drain); uptime is on trio's clock.
    """

    def __init__(self, running: Running, loaded: LoadedConfig, wall: Callable[[], float] = time.time) -> None:
        self._running = running
        self._wall = wall
        self._started = trio.current_time()
        self._draining = False
        self._redactor_of: Config | None = None
        self._redactor_cache = Redactor()

    def _redactor(self) -> Redactor:
        """Masking rules and secrets of the current config (rebuilt after a reload)."""
        config = self._running.config  # a reload replaces it
        if self._redactor_of is not config:
            self._redactor_cache = config_redactor(config, keep=self._running.redaction.redactor)
            self._redactor_of = config
        return self._redactor_cache

    async def __call__(self, request: Any, call: Call) -> Any:
        tag = type(request).__struct_config__.tag
        if tag not in MUTATING or getattr(request, "dry_run", False):
            return await self._dispatch(request, call)
        try:
            result = await self._dispatch(request, call)
        except CommandError as exc:
            await audit.record(self._running, call.peer, tag, request, f"error: {exc}", self._redactor())
            raise
        await audit.record(
            self._running, call.peer, tag, request, f"ok: {audit.summary(result)}", self._redactor()
        )
        return result

    async def refused(self, peer: Peer, command: str, outcome: str) -> None:
        """Record a connection the access check turned away."""
        await audit.refused(self._running, peer, command, outcome)

    async def _dispatch(self, request: Any, call: Call) -> Any:
        running = self._running
        match request:
            case StatusRequest():
                uptime = trio.current_time() - self._started
                return await status.status(running, self._redactor(), uptime_s=uptime)
            case StatsRequest():
                return await status.stats(running)
            case PauseRequest(name=name):
                return await pausing.for_the_cluster(
                    running, pausing.pause_or_resume(running, name, pause=True)
                )
            case ResumeRequest(name=name):
                return await pausing.for_the_cluster(
                    running, pausing.pause_or_resume(running, name, pause=False)
                )
            case DrainRequest(timeout=timeout):
                if self._draining:
                    raise CommandError("already draining")
                number = await pausing.start_cluster_drain(running, timeout)
                self._draining = True
                return await pausing.drain(running, timeout, call, self._wall, number)
            case DlqListRequest():
                return await dlq.list_dead(running, request, self._redactor())
            case DlqShowRequest(id=delivery_id):
                return await dlq.show(running, delivery_id, self._redactor())
            case DlqRetryRequest():
                return await dlq.retry(running, request)
            case DlqPurgeRequest():
                return await dlq.purge(running, request)
            case EventRequest(id=event_id):
                return await event.event(running, event_id, self._redactor())
            case AuditRequest(limit=limit):
                return await audit.read(running, limit)
            case ReloadRequest():
                return await self._reload()
            case TapRequest():
                return await tap.tap(running, request, call, self._redactor)
            case ReplayRequest():
                return await replay.replay(running, request, call)
            case AlertsRequest():
                alerter = running.alerter
                return AlertsResult(alerter.views() if alerter is not None else [])
        raise CommandError(f"unhandled command {type(request).__name__}")

    async def _reload(self) -> ReloadResult:
        result = await reload(self._running)
        if not result.applied:
            problems = "".join(f"\n  {error}" for error in result.errors)
            raise CommandError(f"reload refused, nothing changed:{problems}")
        return result
