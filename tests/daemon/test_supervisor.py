"""The supervisor on trio's virtual clock: restarts with backoff, readiness, escalation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from daemon.config.sections import SupervisorConfig
from daemon.config.units import Duration
from daemon.errors import TooManyRestarts
from daemon.supervisor import Supervisor


def policy(
    max_restarts: int = 100, window: float = 60, initial_backoff: float = 1, max_backoff: float = 30
) -> SupervisorConfig:
    return SupervisorConfig(
        max_restarts=max_restarts,
        window=Duration(window),
        initial_backoff=Duration(initial_backoff),
        max_backoff=Duration(max_backoff),
    )


class Script:
    """Shared by every incarnation of one actor: when each started, and how each one ends.

    `plan(n)` says what incarnation number `n` (1-based) does after `started()`: a float runs for
    that many seconds then crashes, `None` runs until cancelled, `"return"` returns at once, and
    `"early"` crashes before calling `started()`.
    """

    def __init__(self, plan: Callable[[int], float | str | None]) -> None:
        self.plan = plan
        self.starts: list[float] = []
        self.incarnations = 0
        self.reached: dict[int, trio.Event] = {}

    def factory(self) -> Actor:
        return Actor(self)

    def incarnation(self, n: int) -> trio.Event:
        """Set once incarnation `n` has started."""
        return self.reached.setdefault(n, trio.Event())

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


class Actor:
    def __init__(self, script: Script) -> None:
        self.script = script

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        script = self.script
        script.incarnations += 1
        n = script.incarnations
        step = script.plan(n)
        if step == "early":
            raise RuntimeError(f"incarnation {n} failed to start")
        script.starts.append(trio.current_time())
        task_status.started()
        script.incarnation(n).set()
        if step == "return":
            return
        if step is None:
            await trio.sleep_forever()
        assert isinstance(step, float | int)
        await trio.sleep(step)
        raise RuntimeError(f"incarnation {n} crashed")


def crash_times(times: int, after: float = 0.0) -> Callable[[int], float | None]:
    return lambda n: after if n <= times else None


@pytest.mark.parametrize(
    ("streak", "draw", "expected"),
    [
        (1, 0.0, 0.5),
        (1, 1.0, 1.0),
        (2, 0.0, 1.0),
        (3, 0.5, 3.0),
        (5, 1.0, 16.0),
        (6, 1.0, 30.0),
        (6, 0.0, 15.0),
        (100, 1.0, 30.0),
        (5_000, 0.0, 15.0),
    ],
)
def test_backoff_is_half_fixed_half_jitter_and_capped(streak: int, draw: float, expected: float) -> None:
    assert Supervisor(policy(), rng=lambda: draw).backoff(streak) == expected


async def test_crashing_actor_restarts_with_growing_backoff_while_others_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(policy(initial_backoff=1, max_backoff=30), rng=lambda: 0.0)
    crasher = Script(crash_times(4))
    steady = Script(lambda n: None)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "steady", steady.factory)
        await nursery.start(supervisor.supervise, "crasher", crasher.factory)
        with trio.fail_after(60):
            await crasher.incarnation(5).wait()
        assert supervisor.ready
        nursery.cancel_scope.cancel()

    assert crasher.gaps() == [0.5, 1.0, 2.0, 4.0]
    assert supervisor.actors["crasher"].restarts == 4
    assert supervisor.actors["crasher"].last_error == "RuntimeError: incarnation 4 crashed"
    assert supervisor.total_restarts == 4
    assert steady.incarnations == 1
    assert supervisor.actors["steady"].restarts == 0
    assert supervisor.actors["steady"].state == "running"


async def test_streak_resets_after_an_incarnation_runs_for_max_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(policy(initial_backoff=1, max_backoff=8), rng=lambda: 0.0)
    # Three quick crashes grow the backoff; then one that ran 10 s (>= max_backoff) starts afresh.
    script = Script({1: 0.0, 2: 0.0, 3: 10.0, 4: 0.0}.get)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "flaky", script.factory)
        with trio.fail_after(60):
            await script.incarnation(5).wait()
        nursery.cancel_scope.cancel()

    assert script.gaps() == [0.5, 1.0, 10.0 + 0.5, 1.0]


async def test_ready_once_every_actor_started_healthy_only_while_all_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(policy(initial_backoff=10, max_backoff=10), rng=lambda: 0.0)
    assert not supervisor.ready
    crasher = Script(lambda n: 3.0 if n == 1 else None)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "steady", Script(lambda n: None).factory)
        await nursery.start(supervisor.supervise, "crasher", crasher.factory)
        started = trio.current_time()
        assert supervisor.ready

        await trio.sleep_until(started + 4)  # crashed at +3, restarts at +8
        assert supervisor.actors["crasher"].state == "backoff"
        assert supervisor.ready
        assert not supervisor.healthy

        await trio.sleep_until(started + 9)
        assert supervisor.actors["crasher"].state == "running"
        assert supervisor.healthy
        nursery.cancel_scope.cancel()


async def test_start_waits_for_an_incarnation_that_gets_going(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(policy(initial_backoff=2, max_backoff=2), rng=lambda: 0.0)
    script = Script(lambda n: "early" if n <= 2 else None)

    async with trio.open_nursery() as nursery:
        began = trio.current_time()
        await nursery.start(supervisor.supervise, "slow", script.factory)
        assert trio.current_time() - began == 2.0
        assert script.incarnations == 3
        assert supervisor.ready
        nursery.cancel_scope.cancel()


async def test_normal_return_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(policy())
    script = Script(lambda n: "return")

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "oneshot", script.factory)
        await nursery.start(supervisor.supervise, "steady", Script(lambda n: None).factory)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()

    assert script.incarnations == 1
    assert supervisor.actors["oneshot"].state == "stopped"
    assert supervisor.actors["oneshot"].restarts == 0


async def test_too_many_restarts_within_the_window_escalates(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(
        policy(max_restarts=3, window=60, initial_backoff=1, max_backoff=1), rng=lambda: 0.0
    )
    crasher = Script(lambda n: 0.0)
    steady = Script(lambda n: None)

    with pytest.RaisesGroup(
        pytest.RaisesExc(
            TooManyRestarts, match=r"^4 actor restarts within 60s \(max_restarts = 3\); last: crasher"
        )
    ) as group:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.supervise, "steady", steady.factory)
            await nursery.start(supervisor.supervise, "crasher", crasher.factory)

    [error] = group.value.exceptions
    assert isinstance(error.__cause__, RuntimeError)
    assert crasher.incarnations == 4
    assert steady.incarnations == 1


async def test_restarts_spread_beyond_the_window_never_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(
        policy(max_restarts=1, window=10, initial_backoff=1, max_backoff=5), rng=lambda: 0.0
    )
    script = Script(lambda n: 20.0 if n <= 6 else None)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "slow-crasher", script.factory)
        with trio.fail_after(600):
            await script.incarnation(7).wait()
        nursery.cancel_scope.cancel()

    assert supervisor.actors["slow-crasher"].restarts == 6
    assert script.gaps() == [20.5] * 6


async def test_crash_loop_under_the_restart_budget_keeps_being_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 10 restarts allowed per 30 s, backoff capped at 10 s: an actor that crashes at once every time
    # settles at 3 restarts per window, never escalates, and its streak grows without bound.
    supervisor = Supervisor(
        policy(max_restarts=10, window=30, initial_backoff=0.1, max_backoff=10), rng=lambda: 1.0
    )
    script = Script(lambda n: 0.0 if n <= 1200 else None)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "looping", script.factory)
        with trio.fail_after(24 * 3600):
            await script.incarnation(1201).wait()
        nursery.cancel_scope.cancel()

    assert supervisor.actors["looping"].restarts == 1200
    assert set(script.gaps()[-100:]) == {10.0}


class Finisher:
    """An actor with `stop()`: it finishes `finishing` seconds after being asked, like a sink."""

    def __init__(self, finishing: float) -> None:
        self.finishing = finishing
        self.asked = trio.Event()
        self.finished = False

    def stop(self) -> None:
        self.asked.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.asked.wait()
        await trio.sleep(self.finishing)
        self.finished = True


async def test_stop_ends_one_actor_and_forgets_it_while_the_others_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(policy())
    steady, doomed = Script(lambda n: None), Script(lambda n: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "steady", steady.factory)
        await nursery.start(supervisor.supervise, "doomed", doomed.factory)
        began = supervisor.actors["steady"].started_at
        await supervisor.stop("doomed")
        assert set(supervisor.actors) == {"steady"}
        assert supervisor.actors["steady"].state == "running"
        assert supervisor.actors["steady"].started_at == began
        # The name is free again: a replacement can be supervised under it.
        supervisor.start(nursery, "doomed", doomed.factory)
        assert await supervisor.started("doomed", timeout=1)
        assert doomed.incarnations == 2
        assert steady.incarnations == 1
        nursery.cancel_scope.cancel()


async def test_stop_gives_an_actor_with_stop_its_grace_then_cancels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(policy())
    quick, slow = Finisher(finishing=1), Finisher(finishing=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "quick", lambda: quick)
        await nursery.start(supervisor.supervise, "slow", lambda: slow)
        began = trio.current_time()
        await supervisor.stop("quick", grace=10)
        assert quick.finished
        assert trio.current_time() - began == pytest.approx(1)
        began = trio.current_time()
        await supervisor.stop("slow", grace=10)
        assert slow.asked.is_set()
        assert not slow.finished
        assert trio.current_time() - began == pytest.approx(10)
        assert supervisor.actors == {}


async def test_stop_cancels_an_actor_in_backoff_at_once(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(policy(initial_backoff=100, max_backoff=100), rng=lambda: 1.0)
    crasher = Script(crash_times(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.supervise, "crasher", crasher.factory)
        while supervisor.actors["crasher"].state != "backoff":
            await trio.sleep(0.001)
        began = trio.current_time()
        await supervisor.stop("crasher", grace=30)
        assert trio.current_time() == began
        assert crasher.incarnations == 1


async def test_a_name_is_supervised_once_at_a_time() -> None:
    supervisor = Supervisor(policy())
    async with trio.open_nursery() as nursery:
        supervisor.start(nursery, "one", Script(lambda n: None).factory)
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start(nursery, "one", Script(lambda n: None).factory)
        nursery.cancel_scope.cancel()
