"""Alert notification channels: a JSON webhook, a Slack-compatible webhook, a command, the log.

`Notifiers.send(notification)` delivers one notification to its channel and raises
`NotifyError` with a short reason when the channel did not take it (non-2xx answer, transport
error, timeout, non-zero exit); the alerter retries at its next evaluation.

Timeouts: every send is bounded by its channel's `timeout` (the log channel cannot block).
A command is run without a shell, with its arguments as configured (placeholders replaced as
whole arguments, so an alert's text can never become shell syntax), the notification as JSON
on stdin and `FERRY_ALERT_*` variables; past its timeout it gets SIGTERM, then SIGKILL.

Secrets: header values and the Slack URL are secret references; they are revealed only into
the request and never appear in an error text (errors name the channel and the status).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Final, final

import httpx
import msgspec
import trio

from actors.alerting.config import (
    BUILTIN_LOG,
    ChannelConfig,
    CommandChannelConfig,
    LogChannelConfig,
    SlackChannelConfig,
    WebhookChannelConfig,
)

__all__ = ["Notification", "Notifiers", "NotifyError"]

log = logging.getLogger("ferry.alerts")
_STDERR_EXCERPT: Final = 200
_encode = msgspec.json.Encoder().encode
_ICONS: Final = {"firing": ":rotating_light:", "resolved": ":white_check_mark:"}


class NotifyError(Exception):
    """A channel did not take a notification."""


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """What every channel is told (the webhook's JSON body, the command's stdin)."""

    alert: str
    status: str  # firing | resolved
    severity: str
    summary: str
    description: str | None
    expr: str
    value: float | None
    threshold: float | None
    since: float
    """When the firing began (Unix time)."""
    at: float
    """When this notification was decided (resolved: when the rule resolved)."""
    step: int | None
    """The escalation step (firing), None for resolved."""
    channel: str
    service: str
    host: str


@final
class Notifiers:
    """The configured channels (plus the built-in `log`), sharing one HTTP client."""

    def __init__(self, channels: Mapping[str, ChannelConfig], client: httpx.AsyncClient) -> None:
        self._channels: dict[str, ChannelConfig] = {BUILTIN_LOG: LogChannelConfig(), **channels}
        self._client = client
        self.host = socket.gethostname()

    def __repr__(self) -> str:
        return f"<Notifiers [{', '.join(sorted(self._channels))}]>"

    async def send(self, notification: Notification) -> None:
        """Deliver `notification` to its channel; raise `NotifyError` if it did not take it."""
        channel = self._channels[notification.channel]
        if isinstance(channel, LogChannelConfig):
            level = channel.level.upper() if notification.status == "firing" else "INFO"
            fields = msgspec.to_builtins(notification)
            log.log(
                logging.getLevelNamesMapping()[level],
                f"alert {notification.status}",
                extra={"fields": fields},
            )
        elif isinstance(channel, WebhookChannelConfig):
            headers = {name: ref.value.reveal() for name, ref in channel.headers.items()}
            await self._post(channel.url, _encode(notification), headers, channel.timeout)
        elif isinstance(channel, SlackChannelConfig):
            await self._post(
                channel.url.value.reveal(), _encode({"text": _slack_text(notification)}), {}, channel.timeout
            )
        elif isinstance(channel, CommandChannelConfig):
            await _run(channel, notification)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                headers = {"content-type": "application/json", **headers}
                response = await self._client.post(url, content=body, headers=headers, timeout=timeout)
        except trio.TooSlowError:
            raise NotifyError(f"no answer within {timeout:g}s") from None
        except httpx.HTTPError as exc:
            reason = str(exc).replace(url, "<url>") or "no details"
            raise NotifyError(f"{type(exc).__name__}: {reason}") from None
        if not 200 <= response.status_code < 300:
            raise NotifyError(f"HTTP {response.status_code}")


def _slack_text(n: Notification) -> str:
    head = f"{_ICONS.get(n.status, '')} *[{n.status.upper()}]* {n.alert} ({n.severity})"
    lines = [head.strip(), n.summary]
    if n.description:
        lines.append(n.description)
    return "\n".join(lines)


def _argv(command: list[str], n: Notification) -> list[str]:
    values = {
        "{alert}": n.alert,
        "{status}": n.status,
        "{severity}": n.severity,
        "{summary}": n.summary,
        "{value}": "" if n.value is None else f"{n.value:g}",
    }
    argv = []
    for argument in command:
        filled = argument
        for placeholder, value in values.items():
            filled = filled.replace(placeholder, value)
        argv.append(filled)
    return argv


async def _run(channel: CommandChannelConfig, n: Notification) -> None:
    env = {
        **os.environ,
        "FERRY_ALERT": n.alert,
        "FERRY_ALERT_STATUS": n.status,
        "FERRY_ALERT_SEVERITY": n.severity,
        "FERRY_ALERT_SUMMARY": n.summary,
        "FERRY_ALERT_VALUE": "" if n.value is None else f"{n.value:g}",
    }
    argv = _argv(channel.command, n)
    try:
        with trio.fail_after(channel.timeout):
            done: Any = await trio.run_process(
                argv, stdin=_encode(n), capture_stdout=True, capture_stderr=True, check=False, env=env
            )
    except trio.TooSlowError:
        raise NotifyError(f"{argv[0]} did not finish within {channel.timeout:g}s (killed)") from None
    except OSError as exc:
        raise NotifyError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", "replace").strip()[:_STDERR_EXCERPT]
        raise NotifyError(f"{argv[0]} exited with {done.returncode}" + (f": {stderr}" if stderr else ""))
