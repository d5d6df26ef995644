"""Alerting config: `[alerting]`, rules as `[alerts.NAME]`, notification channels as `[channels.NAME]`.

A rule is a threshold (`expr` with a comparison) or, with an `anomaly` table, an anomaly rule
(`expr` is a value; its EWMA z-score decides). Its `notify` steps are the escalation: step 0
when it starts firing, each later step once it has been firing for that step's `after`.
Expressions are parsed here, against the daemon's metric catalogue, so a rule naming an unknown
metric, a bad expression or a bad duration is a config error with its TOML path.

A channel named `log` exists without being declared (it writes the notification to the log);
declaring `[channels.log]` replaces it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal, Protocol

import msgspec
from msgspec import Meta

from actors.alerting.expr import ExprError, parse_expr
from daemon.config.base import ComponentName, Section, default
from daemon.config.secrets import SecretRef
from daemon.config.units import Duration

BUILTIN_LOG = "log"


class AlertingConfig(Section, frozen=True):
    """How often alert rules are evaluated."""

    interval: Annotated[
        Duration,
        Meta(description="Time between two evaluations of every rule (and the resolution of `for`/`after`)."),
    ] = default(Duration(15))


class WebhookChannelConfig(Section, frozen=True, tag="webhook", tag_field="type"):
    """POSTs each notification as a JSON object (observability.md#alerting lists its fields)."""

    url: Annotated[str, Meta(pattern=r"^https?://", description="Where to POST.")]
    headers: Annotated[
        dict[str, SecretRef],
        Meta(description="Extra request headers; values are secret references (`env:`, `file:`, ...)."),
    ] = {}
    timeout: Annotated[Duration, Meta(description="Whole-request timeout.")] = default(Duration(10))


class SlackChannelConfig(Section, frozen=True, tag="slack", tag_field="type"):
    """POSTs `{"text": ...}` to a Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat)."""

    url: Annotated[
        SecretRef,
        Meta(description="The incoming-webhook URL: a secret reference (the URL is the credential)."),
    ]
    timeout: Annotated[Duration, Meta(description="Whole-request timeout.")] = default(Duration(10))


class CommandChannelConfig(Section, frozen=True, tag="command", tag_field="type"):
    """Runs a program (no shell) with the notification as JSON on stdin and `FERRY_ALERT_*` variables.

    `{alert}`, `{status}`, `{severity}`, `{summary}` and `{value}` in an argument are replaced by
    the notification's values (as whole arguments: no shell ever parses them).
    """

    command: Annotated[
        list[Annotated[str, Meta(min_length=1)]],
        Meta(min_length=1, description='Program and arguments, e.g. `["/usr/local/bin/page", "{alert}"]`.'),
    ]
    timeout: Annotated[
        Duration, Meta(description="The program is killed (SIGTERM, then SIGKILL) after this long.")
    ] = default(Duration(30))


class LogChannelConfig(Section, frozen=True, tag="log", tag_field="type"):
    """Writes each notification as a log line on the `ferry.alerts` logger."""

    level: Annotated[
        Literal["info", "warning", "error"],
        Meta(description="Level of firing notifications (resolved: info)."),
    ] = "warning"


ChannelConfig = WebhookChannelConfig | SlackChannelConfig | CommandChannelConfig | LogChannelConfig


class NotifyStep(Section, frozen=True):
    """One escalation step: notify `channel` once the rule has been firing for `after`."""

    channel: Annotated[ComponentName, Meta(description="A `[channels.NAME]`, or `log`.")]
    after: Annotated[
        Duration, Meta(description="Firing time before this step is notified; 0s: when it starts firing.")
    ] = default(Duration(0))


class AnomalyConfig(Section, frozen=True):
    """Anomaly detection: EWMA mean and variance of the rule's value; fires on a large z-score."""

    z: Annotated[
        float, Meta(gt=0, description="Fire while |value - mean| / stddev stays above this (for `for`).")
    ] = 3.0
    direction: Annotated[
        Literal["above", "below", "both"],
        Meta(description="Which deviations count: above the mean, below it, or both."),
    ] = "above"
    half_life: Annotated[
        Duration, Meta(description="How fast the mean forgets: a reading's weight halves after this long.")
    ] = default(Duration(3600))
    warmup: Annotated[
        Duration, Meta(description="Learning time after the first reading before the rule may fire.")
    ] = default(Duration(1800))
    min_stddev: Annotated[
        float,
        Meta(
            ge=0,
            description="Floor of the standard deviation, so a perfectly flat history does not turn "
            "every small change into a huge z-score.",
        ),
    ] = 0.0


class AlertRuleConfig(Section, frozen=True):
    """An alert rule on the daemon's metrics (observability.md#alerting has the expression language)."""

    expr: Annotated[
        str,
        Meta(
            min_length=1,
            description='Threshold: `VALUE CMP NUMBER`, e.g. `ferry.queue.depth{stage="crm"} > 1000`, '
            '`rate(ferry.deliveries{outcome="dead"}, 5m) > 0.1`, `p99(ferry.delivery.latency, 5m) > 2`. '
            "Anomaly rules: a VALUE only.",
        ),
    ]
    notify: Annotated[
        list[NotifyStep], Meta(min_length=1, description="Escalation steps, in order of `after`.")
    ]
    for_: Annotated[Duration, Meta(description="How long the condition must hold before the rule fires.")] = (
        msgspec.field(default_factory=lambda: Duration(0), name="for")
    )
    severity: Annotated[
        Literal["info", "warning", "critical"], Meta(description="Passed on in every notification.")
    ] = "warning"
    description: Annotated[str | None, Meta(description="Free text passed on in every notification.")] = None
    anomaly: Annotated[
        AnomalyConfig | None, Meta(description="Present: an anomaly rule on `expr`'s value.")
    ] = None


class AlertsDeclared(Protocol):
    """What `check_alerts` reads of the root config (named here, so this module need not import it)."""

    @property
    def alerts(self) -> Mapping[str, AlertRuleConfig]: ...

    @property
    def channels(self) -> Mapping[str, ChannelConfig]: ...


def check_alerts(config: AlertsDeclared, known: Mapping[str, str]) -> Iterator[str]:
    """Rule errors with their TOML paths: expressions, channels named, step order."""
    for name, rule in config.alerts.items():
        path = f"$.alerts.{name}"
        try:
            parse_expr(rule.expr, known, comparison=rule.anomaly is None)
        except ExprError as exc:
            yield f"{path}.expr: {exc}"
        previous = 0.0
        for index, step in enumerate(rule.notify):
            if step.channel not in config.channels and step.channel != BUILTIN_LOG:
                yield f"{path}.notify[{index}].channel: unknown channel {step.channel!r}"
            if step.after < previous:
                yield f"{path}.notify[{index}].after: earlier than the step before it"
            previous = step.after
