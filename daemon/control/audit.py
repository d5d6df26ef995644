"""The audit trail of the control socket, and `ferry ctl audit` that reads it.

Every command that changes something (`pause`, `resume`, `dlq retry`, `dlq purge`, `drain`,
`reload`, `replay`) is recorded in the store's `audit` table once it has run: time, the peer's uid
and pid, the command, its arguments as JSON (masked by `[telemetry] mask`) and its outcome
(`ok: …` from `summary`, or `error: …`). Reads (`status`, `dlq list/show`, `stats`, `audit`) are
not recorded; connections the access check turns away are (`refused`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import Struct

from daemon.control.dlq import DlqPurgeResult, DlqRetryResult
from daemon.control.pausing import DrainResult, PauseResult
from daemon.control.protocol import answered
from daemon.control.replay import ReplayResult
from daemon.control.server import Peer
from daemon.reload import ReloadResult
from daemon.store.ops import AuditRow
from daemon.telemetry.masking import Redactor

if TYPE_CHECKING:
    from daemon.running import Running


class AuditResult(Struct, frozen=True):
    rows: list[AuditRow]


async def read(running: Running, limit: int) -> AuditResult:
    return AuditResult(await answered(running.store.read_audit(limit)))


async def record(
    running: Running, peer: Peer, command: str, request: Any, outcome: str, redactor: Redactor
) -> None:
    """Write one audit row for `request` as `peer` sent it; its arguments masked."""
    fields = {k: v for k, v in msgspec.structs.asdict(request).items() if k != "v" and v is not None}
    arguments = msgspec.json.encode(redactor.mask(fields)).decode()
    await answered(
        running.store.record_audit(
            uid=peer.uid, pid=peer.pid, command=command, arguments=arguments, outcome=outcome
        )
    )


async def refused(running: Running, peer: Peer, command: str, outcome: str) -> None:
    """Record a connection the access check turned away."""
    await answered(
        running.store.record_audit(
            uid=peer.uid, pid=peer.pid, command=command, arguments="{}", outcome=outcome
        )
    )


def summary(result: Any) -> str:
    """A short outcome for the audit trail."""
    match result:
        case PauseResult(name=name, paused=paused, changed=changed):
            return f"{name} {'paused' if paused else 'resumed'}{'' if changed else ' (no change)'}"
        case DlqRetryResult(retried=retried):
            return f"{retried} retried"
        case DlqPurgeResult(purged=purged, dry_run=dry_run):
            return f"{purged} {'would be purged' if dry_run else 'purged'}"
        case ReplayResult(replay=number, events=events, deliveries=deliveries):
            return f"replay {number}: {events} event(s), {deliveries} new deliveries"
        case DrainResult(drained=drained, outstanding=outstanding):
            return "drained" if drained else f"timed out, {outstanding} outstanding"
        case ReloadResult(added=added, changed=changed, removed=removed):
            parts = [
                f"{label} {', '.join(names)}"
                for label, names in (("added", added), ("changed", changed), ("removed", removed))
                if names
            ]
            return "reloaded: " + ("; ".join(parts) or "nothing changed")
    return "done"
