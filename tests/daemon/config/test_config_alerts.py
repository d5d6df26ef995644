"""Alert rules and channels in the config: every bad rule is an error with its TOML path."""

from __future__ import annotations

import pytest

from actors.alerting.config import SlackChannelConfig
from daemon.config.root import parse
from daemon.errors import ConfigError

GOOD = """
[alerting]
interval = "10s"

[channels.ops]
type = "webhook"
url = "https://hooks.example/ferry"
headers = { authorization = "env:FERRY_TEST_TOKEN" }

[channels.chat]
type = "slack"
url = "env:FERRY_TEST_SLACK"

[channels.pager]
type = "command"
command = ["/usr/local/bin/page", "--alert", "{alert}"]
timeout = "5s"

[alerts.crm_backlog]
expr = 'ferry.queue.depth{stage="crm"} > 1000'
for = "5m"
severity = "critical"
notify = [{ channel = "log" }, { channel = "chat", after = "10m" }, { channel = "pager", after = "30m" }]

[alerts.ingest_drop]
expr = "rate(ferry.events.received, 5m)"
anomaly = { z = 4, direction = "below", half_life = "6h", warmup = "1h" }
notify = [{ channel = "ops" }]
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.problems


def test_a_complete_alerting_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_TEST_TOKEN", "Bearer t0ken")
    monkeypatch.setenv("FERRY_TEST_SLACK", "https://hooks.slack.example/T/B/X")
    config = parse(GOOD)
    rule = config.alerts["crm_backlog"]
    assert (rule.for_, rule.severity, [s.after for s in rule.notify]) == (
        300.0,
        "critical",
        [0.0, 600.0, 1800.0],
    )
    assert config.alerts["ingest_drop"].anomaly is not None
    chat = config.channels["chat"]
    assert isinstance(chat, SlackChannelConfig)
    assert chat.url.value.reveal() == "https://hooks.slack.example/T/B/X"
    assert config.alerting.interval == 10.0


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("expr = 'ferry.queue.dpth > 1'", "$.alerts.r.expr: unknown metric 'ferry.queue.dpth'"),
        ("expr = 'rate(ferry.queue.depth, 5m) > 1'", "$.alerts.r.expr: rate() needs a counter"),
        ("expr = 'ferry.deliveries >> 1'", "$.alerts.r.expr: expected number, got '>'"),
        ("expr = 'ferry.deliveries'", "$.alerts.r.expr: a threshold rule needs a comparison"),
        ("expr = 'ferry.deliveries > 1'\nanomaly = {}", "$.alerts.r.expr: an anomaly rule takes a value"),
        ("expr = 'ferry.deliveries > 1'\nfor = '5 minutes'", "$.alerts.r.for: invalid duration '5 minutes'"),
        ("expr = 'ferry.deliveries > 1'\nfor = '-1s'", "$.alerts.r.for:"),
        ("expr = 'ferry.deliveries > 1'\nseverity = 'meh'", "$.alerts.r.severity: Invalid enum value 'meh'"),
        ("expr = 'ferry.deliveries > 1'\nwhen = 1", "$.alerts.r.when: unknown key"),
    ],
)
def test_bad_rules_are_errors_with_paths(rule: str, expected: str) -> None:
    problems = errors(
        f"[alerts.r]\n{rule}\n" + ("" if "notify" in rule else 'notify = [{channel = "log"}]\n')
    )
    assert any(problem.startswith(expected) for problem in problems), problems


def test_bad_escalations_and_channels_are_errors_with_paths() -> None:
    problems = errors(
        """
[channels.hook]
type = "webhook"
url = "ftp://nope"

[channels.run]
type = "command"
command = []

[channels.odd]
type = "pigeon"

[alerts.r]
expr = "ferry.actor.restarts > 0"
notify = [{ channel = "log", after = "10m" }, { channel = "nowhere" }, { channel = "log", after = "1x" }]

[alerts.s]
expr = "ferry.actor.restarts > 0"
notify = []
"""
    )
    assert any(p.startswith("$.channels.hook.url:") for p in problems), problems
    assert any(p.startswith("$.channels.run.command:") for p in problems), problems
    assert "$.channels.odd.type: Invalid value 'pigeon'" in problems
    assert any(p.startswith("$.alerts.r.notify[2].after: invalid duration '1x'") for p in problems), problems
    assert any(p.startswith("$.alerts.s.notify:") for p in problems), problems


def test_unknown_channel_and_out_of_order_steps() -> None:
    problems = errors(
        """
[alerts.r]
expr = "ferry.actor.restarts > 0"
notify = [{ channel = "log", after = "10m" }, { channel = "nowhere", after = "1m" }]
"""
    )
    assert problems == [
        "$.alerts.r.notify[1].channel: unknown channel 'nowhere'",
        "$.alerts.r.notify[1].after: earlier than the step before it",
    ]


def test_a_missing_slack_secret_names_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_TEST_SLACK", raising=False)
    problems = errors('[channels.chat]\ntype = "slack"\nurl = "env:FERRY_TEST_SLACK"\n')
    assert problems[0].startswith("$.channels.chat.url: env:FERRY_TEST_SLACK")
