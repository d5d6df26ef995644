"""Alert rule evaluation: a pure state machine per rule, driven by a clock the caller passes.

States: `ok` -> `pending` (the condition holds, for less than `for`) -> `firing` -> `ok`.
With `for = "0s"` a rule goes from `ok` straight to `firing`.

Notifications (what `evaluate` returns; the caller sends them and reports back with `sent`):
    - firing: each escalation step once per firing, when the rule has been firing for the
      step's `after` (step 0 usually at once). A step is marked done only once its channel
      took the notification; a failed one is tried again at the next evaluation (one try per
      interval, never a burst), so a flaky channel is not skipped and a down one cannot storm.
    - resolved: once the condition no longer holds, every channel that was told about the
      firing is told it resolved, each once (tried at up to `RESOLVE_TRIES` evaluations).
    A rule that never fired sends nothing when its condition clears (pending -> ok).

No data (a window still filling after a start or a restart, a gauge never reported, a ratio of
nothing): the rule keeps its state, so a restart neither resolves nor re-fires an alert.

Anomaly rules keep an exponentially weighted mean and variance of their value; `alpha` for a
reading `dt` seconds after the previous one is `1 - 2^(-dt / half_life)`, so the weighting does
not depend on the evaluation interval. The z-score of a reading is taken against the mean and
variance *before* it is folded in; the condition is the z-score beyond `z` (in `direction`),
never during `warmup` after the first reading.

State (`AlertState`) is a msgspec Struct persisted in the store after every evaluation that
changed it (`daemon.store.alerts`), so a restart resumes each rule where it was: a firing alert
stays firing, notified steps are not notified again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from actors.alerting.config import AlertRuleConfig, AnomalyConfig
from actors.alerting.expr import Expr, parse_expr
from daemon.store.alerts import AlertState

__all__ = ["AlertState", "AlertView", "Notice", "Rule", "compile_rule", "evaluate", "sent", "view"]

RESOLVE_TRIES: Final = 3
Status = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Rule:
    """A rule compiled from its config: the parsed expression and the escalation steps."""

    name: str
    config: AlertRuleConfig
    expr: Expr

    @property
    def anomaly(self) -> AnomalyConfig | None:
        return self.config.anomaly


def compile_rule(name: str, config: AlertRuleConfig, known: dict[str, str]) -> Rule:
    """Parse the rule's expression (already validated with the config, so this does not fail)."""
    return Rule(name, config, parse_expr(config.expr, known, comparison=config.anomaly is None))


@dataclass(frozen=True)
class Notice:
    """One notification to send: `rule`'s `status` to `channel` (`step` for a firing one)."""

    rule: str
    status: Status
    channel: str
    step: int | None
    value: float | None
    since: float
    """When the firing began."""
    at: float
    """When this notice was decided (resolved: when the rule resolved)."""


def _condition(rule: Rule, state: AlertState, value: float | None, now: float) -> bool | None:
    """Whether the rule's condition holds now (None: no data); updates an anomaly rule's EWMA."""
    if value is None or math.isnan(value):
        return None
    anomaly = rule.anomaly
    if anomaly is None:
        return rule.expr.holds(value)
    if state.mean is None or state.first_seen is None or state.evaluated_at is None:
        state.mean, state.variance, state.first_seen, state.z = value, 0.0, now, None
        return False
    stddev = max(math.sqrt(state.variance), anomaly.min_stddev)
    deviation = value - state.mean
    # a flat history (stddev 0): any change is infinitely unusual, shown as a large finite z
    z = deviation / stddev if stddev > 0 else math.copysign(math.inf, deviation) if deviation else 0.0
    state.z = z if math.isfinite(z) else math.copysign(1e9, z)
    dt = max(0.0, now - state.evaluated_at)
    alpha = 1 - 2 ** (-dt / anomaly.half_life) if anomaly.half_life > 0 else 1.0
    increment = alpha * deviation
    state.mean += increment
    state.variance = (1 - alpha) * (state.variance + deviation * increment)
    if now - state.first_seen < anomaly.warmup:
        return False
    if anomaly.direction == "above":
        return z > anomaly.z
    if anomaly.direction == "below":
        return z < -anomaly.z
    return abs(z) > anomaly.z


def evaluate(rule: Rule, state: AlertState, value: float | None, now: float) -> list[Notice]:
    """Advance `state` (in place) with the rule's value at `now`; the notifications now due."""
    holds = _condition(rule, state, value, now)
    state.value, state.evaluated_at = value, now
    notices: list[Notice] = []
    if holds is True:
        if state.state == "ok":
            state.state, state.since = "pending", now
        if state.state == "pending" and state.since is not None and now - state.since >= rule.config.for_:
            state.state, state.since, state.notified = "firing", now, []
            state.last_firing, state.fired = now, state.fired + 1
            state.resolving = {}  # a new firing: the previous one's resolved notices are moot
    elif holds is False and state.state != "ok":
        if state.state == "firing":
            steps = rule.config.notify
            for told in state.notified:
                if told < len(steps):  # a reload may have shortened the list
                    state.resolving.setdefault(steps[told].channel, 0)
        state.state, state.since, state.notified = "ok", now, []
    if state.state == "firing" and state.since is not None:
        for index, step in enumerate(rule.config.notify):
            if index not in state.notified and now - state.since >= step.after:
                notices.append(Notice(rule.name, "firing", step.channel, index, value, state.since, now))
    if state.state == "ok" and state.resolving:
        firing_since = state.last_firing if state.last_firing is not None else now
        for channel in state.resolving:
            notices.append(Notice(rule.name, "resolved", channel, None, value, firing_since, now))
    return notices


def sent(state: AlertState, notice: Notice, error: str | None) -> None:
    """Record the outcome of sending `notice` (error None: the channel took it)."""
    state.last_error = None if error is None else f"{notice.channel}: {error}"
    if notice.status == "firing":
        if error is None and notice.step is not None and notice.step not in state.notified:
            state.notified.append(notice.step)
        return
    tries = state.resolving.get(notice.channel)
    if tries is None:
        return
    if error is None or tries + 1 >= RESOLVE_TRIES:
        del state.resolving[notice.channel]
    else:
        state.resolving[notice.channel] = tries + 1


class AlertView(msgspec.Struct, frozen=True, kw_only=True):
    """One rule as `ferry ctl alerts` shows it."""

    name: str
    state: str
    since: float | None
    value: float | None
    expr: str
    kind: Literal["threshold", "anomaly"]
    severity: str
    for_s: float
    notified: list[str]
    """Channels told about the current firing, in step order."""
    next_step: str | None
    """The next escalation step while firing: `CHANNEL after DURATION`."""
    fired: int
    evaluated_at: float | None
    last_error: str | None
    z: float | None = None
    mean: float | None = None


def view(rule: Rule, state: AlertState) -> AlertView:
    """What `ferry ctl alerts` shows of one rule."""
    steps = rule.config.notify
    notified = [steps[i].channel for i in sorted(state.notified) if i < len(steps)]
    pending = [step for i, step in enumerate(steps) if i not in state.notified]
    next_step = None
    if state.state == "firing" and pending:
        next_step = f"{pending[0].channel} after {pending[0].after:g}s"
    anomaly = rule.anomaly is not None
    return AlertView(
        name=rule.name,
        state=state.state,
        since=state.since,
        value=state.value,
        expr=rule.expr.text,
        kind="anomaly" if anomaly else "threshold",
        severity=rule.config.severity,
        for_s=float(rule.config.for_),
        notified=notified,
        next_step=next_step,
        fired=state.fired,
        evaluated_at=state.evaluated_at,
        last_error=state.last_error,
        z=state.z if anomaly else None,
        mean=state.mean if anomaly else None,
    )
