"""Window bookkeeping as a table: which window an output joins, when windows close, restore at start."""

from __future__ import annotations

import pytest

from daemon.store.windows import Windows


def keys_of(windows: Windows) -> list[tuple[int, str, int]]:
    return [(w.id, w.key, w.size) for w in windows.take_closed()]


def test_a_window_closes_at_max_events_and_the_next_output_opens_a_new_one() -> None:
    windows = Windows(max_events=2, max_age=None)
    placed = [windows.join(key, clock=0.0, wall=100.0) for key in ["a", "b", "a", "a", "b", "a"]]
    assert [(w.id, n) for w, n in placed] == [(1, 0), (2, 0), (1, 1), (3, 0), (2, 1), (3, 1)]
    assert keys_of(windows) == [(1, "a", 2), (2, "b", 2), (3, "a", 2)]
    assert windows.open == {}
    assert windows.next_deadline() is None


@pytest.mark.parametrize(
    ("clock", "closed"),
    [(9.999, []), (10.0, ["a"]), (14.999, ["a"]), (15.0, ["a", "b"])],
)
def test_windows_close_by_age_on_the_clock_given(clock: float, closed: list[str]) -> None:
    windows = Windows(max_events=None, max_age=10.0)
    windows.join("a", clock=0.0, wall=1000.0)
    windows.join("b", clock=5.0, wall=1005.0)
    windows.join("a", clock=9.0, wall=1009.0)  # joins; does not extend the window
    assert windows.next_deadline() == 10.0
    windows.expire(clock)
    assert [w.key for w in windows.take_closed()] == closed


def test_count_or_age_whichever_first() -> None:
    windows = Windows(max_events=3, max_age=10.0)
    for _ in range(3):
        windows.join("full", clock=1.0, wall=1.0)
    windows.join("slow", clock=1.0, wall=1.0)
    assert keys_of(windows) == [(1, "full", 3)]
    windows.expire(11.0)
    assert keys_of(windows) == [(2, "slow", 1)]


def test_restore_keeps_the_age_already_spent_and_closes_what_is_due() -> None:
    windows = Windows(max_events=5, max_age=60.0)
    stored = [
        (3, '"young"', 1000.0, 2),  # opened 10 s before the restart: 50 s left
        (4, '"old"', 900.0, 1),  # opened 110 s before: past its age
        (7, '"full"', 1005.0, 5),  # full: closed, its emission did not commit before the crash
    ]
    windows.restore(stored, clock=500.0, wall=1010.0)
    assert sorted(keys_of(windows)) == [(4, '"old"', 1), (7, '"full"', 5)]
    assert list(windows.open) == ['"young"']
    assert windows.next_deadline() == 550.0
    new, n = windows.join('"new"', clock=500.0, wall=1010.0)
    assert (new.id, n) == (8, 0)  # ids continue after the stored ones
    young, n = windows.join('"young"', clock=500.0, wall=1010.0)
    assert (young.id, n, young.size) == (3, 2, 3)


def test_restore_closes_an_older_window_of_a_key_that_has_a_newer_one() -> None:
    windows = Windows(max_events=2, max_age=None)
    windows.restore([(1, "k", 0.0, 1), (2, "k", 1.0, 1)], clock=0.0, wall=2.0)
    assert keys_of(windows) == [(1, "k", 1)]
    assert windows.open["k"].id == 2


def test_close_all_closes_open_windows_oldest_first() -> None:
    windows = Windows(max_events=None, max_age=None)
    for key in ["b", "a", "b"]:
        windows.join(key, clock=0.0, wall=0.0)
    windows.close_all()
    assert keys_of(windows) == [(1, "b", 2), (2, "a", 1)]
    assert windows.open == {}
