"""The alerter: evaluates the alert rules on the daemon's own metrics and sends notifications.

Every `[alerting] interval` it reads every metric at once (`collect`, the in-memory metric
reader: the same instruments OTLP and `/metrics` see, whoever registered them; in cluster mode
merged with every other node's, `cluster`, so rules see the whole cluster), computes each
rule's value (`actors.alerting.expr`), advances the rule's state machine (`actors.alerting.rules`), sends
the notifications now due, concurrently, each bounded by its channel's timeout, and then
stores every rule's state in one transaction.

Delivery of notifications: at least once per escalation step and firing. A step counts as
notified once its channel took the notification, and that is stored after the sends; a crash
in between sends that one notification again after the restart. A channel that fails is tried
again at the next evaluation, so one notification per step per interval at most: no storm.

State: loaded from the store when the actor starts (also after a crash or a daemon restart),
so a firing alert stays firing and is not notified again. Rules removed from the config lose
their stored state at the next save.

Errors: a store that is unavailable or a failing channel is logged and retried at the next
evaluation; neither stops the alerter. Cancellation is never caught: a notification cut off
by shutdown is sent again after the restart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, final

import httpx
import trio

from actors.alerting.expr import Snapshot, Tracker
from actors.alerting.notifiers import Notification, Notifiers, NotifyError
from actors.alerting.rules import AlertState, AlertView, Notice, Rule, compile_rule, evaluate, sent, view
from daemon.config.root import Config
from daemon.errors import StoreUnavailable
from daemon.store.api import Outbox
from daemon.telemetry import metrics

__all__ = ["Alerter"]

log = logging.getLogger("ferry.alerts")


@final
class Alerter:
    """Runs every configured alert rule; see the module docstring for its guarantees."""

    def __init__(
        self,
        config: Config,
        store: Outbox,
        collect: Callable[[], Snapshot],
        *,
        clock: Callable[[], float] = time.time,
        service: str = "ferry",
        cluster: Callable[[Snapshot], Awaitable[Snapshot]] | None = None,
    ) -> None:
        known = metrics.catalogue()
        self.rules: dict[str, Rule] = {
            name: compile_rule(name, rule, known) for name, rule in config.alerts.items()
        }
        self._config = config
        self._store = store
        self._collect = collect
        self._cluster = cluster
        self._clock = clock
        self._service = service
        self._trackers = {name: Tracker(rule.expr) for name, rule in self.rules.items()}
        self.states: dict[str, AlertState] = {}
        self.evaluations = 0
        """Evaluations completed (states stored) since this alerter started."""

    def __repr__(self) -> str:
        firing = sum(state.state == "firing" for state in self.states.values())
        return f"<Alerter [{len(self.rules)} rules, {firing} firing]>"

    def views(self) -> list[AlertView]:
        """Every rule's state as `ferry ctl alerts` shows it (firing first)."""
        order = {"firing": 0, "pending": 1, "ok": 2}
        shown = [view(rule, self.states.get(name) or AlertState()) for name, rule in self.rules.items()]
        return sorted(shown, key=lambda v: (order.get(v.state, 3), v.name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the stored states, report started, then evaluate every interval until cancelled."""
        stored = await self._store.load_alert_states()
        self.states = {name: stored.get(name) or AlertState() for name in self.rules}
        async with httpx.AsyncClient(follow_redirects=False) as client:
            notifiers = Notifiers(self._config.channels, client)
            task_status.started()
            while True:
                await self.evaluate(notifiers)
                await trio.sleep(self._config.alerting.interval)

    async def evaluate(self, notifiers: Notifiers) -> None:
        """One evaluation of every rule; see the module docstring."""
        now = self._clock()
        snapshot = self._collect()
        if self._cluster is not None:
            snapshot = await self._cluster(snapshot)
        due: list[tuple[Rule, AlertState, Notice]] = []
        for name, rule in self.rules.items():
            state = self.states.setdefault(name, AlertState())
            before = state.state
            notices = evaluate(rule, state, self._trackers[name].observe(snapshot, now), now)
            if state.state != before:
                _log_transition(rule, state, before)
            due.extend((rule, state, notice) for notice in notices)
        if due:
            async with trio.open_nursery() as nursery:
                for rule, state, notice in due:
                    nursery.start_soon(self._send, notifiers, rule, state, notice)
        try:
            await self._store.save_alert_states(self.states, frozenset(self.rules))
        except StoreUnavailable as exc:
            log.warning(
                "alert states not stored; retrying next evaluation", extra={"fields": {"error": str(exc)}}
            )
        self.evaluations += 1

    async def _send(self, notifiers: Notifiers, rule: Rule, state: AlertState, notice: Notice) -> None:
        notification = self._notification(rule, state, notice, notifiers.host)
        try:
            await notifiers.send(notification)
        except NotifyError as exc:
            sent(state, notice, str(exc))
            log.warning(
                "alert notification failed; retrying next evaluation",
                extra={
                    "fields": {
                        "alert": rule.name,
                        "status": notice.status,
                        "channel": notice.channel,
                        "error": str(exc),
                    }
                },
            )
        else:
            sent(state, notice, None)

    def _notification(self, rule: Rule, state: AlertState, notice: Notice, host: str) -> Notification:
        return Notification(
            alert=rule.name,
            status=notice.status,
            severity=rule.config.severity,
            summary=summary(rule, state, notice),
            description=rule.config.description,
            expr=rule.expr.text,
            value=notice.value,
            threshold=rule.expr.threshold,
            since=notice.since,
            at=notice.at,
            step=notice.step,
            channel=notice.channel,
            service=self._service,
            host=host,
        )


def summary(rule: Rule, state: AlertState, notice: Notice) -> str:
    """One line saying what fired (or resolved) and why."""
    value = "no data" if notice.value is None else f"{notice.value:g}"
    if notice.status == "resolved":
        lasted = notice.at - notice.since
        return f"{rule.name} resolved after {_duration(lasted)}: {rule.expr.value_text} = {value}"
    if rule.anomaly is not None:
        z = "-" if state.z is None else f"{state.z:.1f}"
        mean = "-" if state.mean is None else f"{state.mean:g}"
        return (
            f"{rule.name}: {rule.expr.value_text} = {value}, z-score {z} beyond {rule.anomaly.z:g} "
            f"(mean {mean})"
        )
    held = f" for {_duration(rule.config.for_)}" if rule.config.for_ else ""
    return f"{rule.name}: {rule.expr.value_text} = {value} ({rule.expr.op} {rule.expr.threshold:g}{held})"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _log_transition(rule: Rule, state: AlertState, before: str) -> None:
    fields: dict[str, Any] = {"alert": rule.name, "from": before, "to": state.state, "expr": rule.expr.text}
    if state.value is not None and math.isfinite(state.value):
        fields["value"] = state.value
    if state.z is not None and rule.anomaly is not None:
        fields["z"] = round(state.z, 2)
    log.info("alert state changed", extra={"fields": fields})
