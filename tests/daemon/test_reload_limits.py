"""Reload and limits: a changed budget is reconfigured in place, its users keep running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from daemon.reload import reload
from tests.daemon.test_reload import Daemon, daemon, sock_dir  # noqa: F401  (fixtures)
from tests.fakes import FakeReceiver

BODY = """
[rate_limits.api]
rate = {rate}
per = "1s"
{extra}
[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "{url}/in"
rate_limit = "api"
"""


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


async def test_a_changed_budget_applies_in_place_without_restarting_its_users(
    daemon: Daemon,  # noqa: F811
    receiver: FakeReceiver,
) -> None:
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, BODY.format(rate=1, extra="", url=receiver.url))
        limiter, sink = running.rate_limits["api"], running.actors.sinks["crm"]
        assert (await daemon.post("/hooks/demo", {"n": 1})).status_code == 202
        extra = "[rate_limits.spare]\nrate = 5\n"
        daemon.write(BODY.format(rate=500, extra=extra, url=receiver.url))
        result = await reload(running)
        assert result.applied, result.errors
        assert (result.added, result.changed, result.removed) == ([], [], [])
        assert running.rate_limits["api"] is limiter, "its users hold it: same object, new settings"
        assert limiter.config.rate == 500
        assert running.actors.sinks["crm"] is sink
        assert sorted(running.rate_limits) == ["api", "spare"]

        daemon.write(BODY.format(rate=500, extra="", url=receiver.url).replace('rate_limit = "api"\n', ""))
        result = await reload(running)
        assert result.applied, result.errors
        assert result.changed == ["sinks.crm"]
        guard = running.actors.sinks["crm"].guard
        assert guard is not None
        assert guard.limiter is None
        running.stop.set()
