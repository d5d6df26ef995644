"""Fresh incarnations (STYLE.md 5): each restart after a crash runs a new actor, handed what
outlives the crash, shown to `ferry ctl` in its place — on trio's MockClock."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from daemon.assembly import _in, incarnations
from daemon.config.sections import SupervisorConfig
from daemon.config.units import Duration
from daemon.supervisor import Supervisor


class Flaky:
    """An actor whose first incarnation crashes once started; later ones run until cancelled."""

    def __init__(self, built: list[Flaky]) -> None:
        self.number = len(built) + 1
        self.counted = 0
        built.append(self)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self.counted += 1
        if self.number == 1:
            raise RuntimeError("half-done state")
        await trio.sleep_forever()


def carry(previous: Flaky, new: Flaky) -> None:
    new.counted += previous.counted


async def test_a_restart_runs_a_fresh_actor_that_inherits_and_is_published(
    autojump_clock: trio.testing.MockClock,
) -> None:
    built: list[Flaky] = []
    first = Flaky(built)
    held = {"transform.t": first}
    supervisor = Supervisor(SupervisorConfig(initial_backoff=Duration(1), max_backoff=Duration(4)))
    factory = incarnations(first, lambda: Flaky(built), carry, _in(held, "transform.t"))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "transform.t", factory)
        while len(built) < 2 or built[1].counted < 2:
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [actor.number for actor in built] == [1, 2]
    assert held["transform.t"] is built[1]  # ferry ctl reads the incarnation that runs
    assert built[1].counted == 2  # its own run and the one it inherited
    assert supervisor.actors["transform.t"].restarts == 1


def test_a_replacement_put_in_place_by_a_reload_is_not_overwritten_by_a_late_restart() -> None:
    built: list[Flaky] = []
    first = Flaky(built)
    replacement = Flaky(built)
    held = {"t": replacement}  # a reload swapped it in before the old one restarted
    factory = incarnations(first, lambda: Flaky(built), carry, _in(held, "t"))
    assert factory() is first
    restarted = factory()
    assert restarted is not first
    assert held["t"] is replacement
