"""The store's interface (`daemon.store.api.Outbox`), tested against every backend.

Written against the interface only: no SQL, no connection, no backend type. Each test runs
once per backend of the `backend` fixture (SQLite today; a PostgreSQL backend plugs in there
and must pass these unchanged). What a backend must do beyond these (group commit, outages,
encryption at rest, migrations) is tested with the backend itself (tests/daemon/store/test_store.py…).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio

from daemon.config.sync import OrderingConfig
from daemon.store.alerts import AlertState
from daemon.store.api import Outbox
from daemon.store.ops import DeadFilter
from daemon.store.ordering import Ordering
from daemon.store.outbox import Derived, Incoming, Outcomes, StoredEvent, delivery_id, derived_id
from daemon.store.poll import PageCheck, PollState
from daemon.store.postgres.store import PostgresStore
from daemon.store.sqlite import Store
from daemon.store.windows import Emitted, Joined, Window
from tests.postgres import postgres_url

__all__ = ["postgres_url"]

FAR = 2e10  # "now" far enough ahead that every pending delivery is due


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    """A running, empty store of each backend (PostgreSQL: a fresh database, `tests/postgres.py`)."""
    store: Store | PostgresStore
    if request.param == "sqlite":
        store = Store.open(tmp_path / "ferry.db", durability="normal")
    else:
        store = PostgresStore.open(request.getfixturevalue("postgres_url"), node="test-node")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()
    store.close()


def event(stream: str, body: object, sinks: tuple[str, ...] = ("crm",), **more: object) -> Incoming:
    return Incoming(stream, msgspec.json.encode(body), None, sinks, **more)  # type: ignore[arg-type]


async def ingest(
    store: Outbox, *bodies: object, stream: str = "hooks", sinks: tuple[str, ...] = ("crm",)
) -> list[str]:
    results = await store.insert_events([event(stream, b, sinks) for b in bodies], dedup_window=3600)
    return [event_id for event_id, _ in results]


# -- ingest: dedup and replay keys -------------------------------------------------------------


async def test_a_repeated_idempotency_key_stores_nothing_and_answers_the_original(backend: Outbox) -> None:
    first = await backend.insert_events([event("hooks", 1, dedup_key="k")], dedup_window=3600)
    again = await backend.insert_events(
        [
            event("hooks", 2, dedup_key="k"),
            event("other", 3, dedup_key="k"),
            event("hooks", 4, dedup_key="j"),
        ],
        dedup_window=3600,
    )
    ((original, duplicate),) = first
    assert not duplicate
    assert again[0] == (original, True)
    assert not again[1][1]
    assert not again[2][1]
    # Within one call too, and past the window a key is new again.
    same = await backend.insert_events(
        [event("hooks", 5, dedup_key="n"), event("hooks", 6, dedup_key="n")], dedup_window=3600
    )
    assert same[1] == (same[0][0], True)
    expired = await backend.insert_events([event("hooks", 7, dedup_key="k")], dedup_window=-1)
    assert not expired[0][1]
    assert [e.payload for e in await backend.read_events(["hooks"], 0, 100)] == [b"1", b"4", b"5", b"7"]


async def test_a_remembered_replay_key_is_refused_until_it_expires(backend: Outbox) -> None:
    until = time.time() + 300
    results = await backend.insert_events(
        [event("hooks", 1, replay=("sig", until)), event("hooks", 2, replay=("sig", until))],
        dedup_window=3600,
    )
    assert not results[0][1]
    assert results[1] == ("", True)
    assert (await backend.insert_events([event("hooks", 3, replay=("sig", until))], dedup_window=3600)) == [
        ("", True)
    ]
    gone = time.time() - 1
    await backend.insert_events([event("hooks", 4, replay=("old", gone))], dedup_window=3600)
    assert not (await backend.insert_events([event("hooks", 5, replay=("old", gone))], dedup_window=3600))[0][
        1
    ]


async def test_a_commit_wakes_the_consumers_it_names(backend: Outbox) -> None:
    woken = backend.signal("crm")
    with trio.fail_after(5):
        await backend.insert_events([event("hooks", 1)], dedup_window=3600, wake=["crm"])
        await woken.wait()


# -- events, cursors, transforms ---------------------------------------------------------------


async def test_events_come_back_in_order_after_a_position(backend: Outbox) -> None:
    a = await ingest(backend, 1, 2, 3)
    await ingest(backend, 9, stream="other")
    events = await backend.read_events(["hooks"], 0, 100)
    assert [e.id for e in events] == a
    assert [e.payload for e in events] == [b"1", b"2", b"3"]
    assert events == sorted(events, key=lambda e: e.seq)
    assert len({e.seq for e in events}) == 3
    assert await backend.read_events(["hooks"], events[0].seq, 1) == [events[1]]
    both = await backend.read_events(["hooks", "other"], 0, 100)
    assert [e.stream for e in both] == ["hooks", "hooks", "hooks", "other"]
    assert await backend.cursor("shape") == 0


async def test_a_transform_commit_stores_outputs_deliveries_dead_letters_and_cursor(backend: Outbox) -> None:
    await ingest(backend, 1, 2, 3, sinks=())
    one, two, three = await backend.read_events(["hooks"], 0, 100)
    outputs = [
        Derived(one, 0, b'"a"'),
        Derived(one, 1, b'"b"', ["erp"]),
        Derived(two, 0, b'"c"', []),  # routed nowhere: stored, no delivery
    ]
    stored = await backend.commit_transform(
        "shape", three.seq, outputs, [(three, "jq: error", 2)], ["crm", "erp"], wake=["crm"]
    )
    assert stored == 3
    assert await backend.cursor("shape") == three.seq
    derived = await backend.read_events(["shape"], 0, 100)
    assert [e.id for e in derived] == [
        derived_id(one.id, "shape", 0),
        derived_id(one.id, "shape", 1),
        derived_id(two.id, "shape", 0),
    ]
    assert derived[0].id == f"{one.id}.shape"
    assert derived[1].id == f"{one.id}.shape.1"
    due_crm = await backend.due_deliveries("crm", FAR, 100)
    due_erp = await backend.due_deliveries("erp", FAR, 100)
    assert [d.id for d in due_crm] == [delivery_id(derived[0].id, "crm")]
    assert [d.id for d in due_erp] == [delivery_id(derived[0].id, "erp"), delivery_id(derived[1].id, "erp")]
    total, letters = await backend.list_dead(DeadFilter(stages=["shape"]), 10)
    assert total == 1
    assert letters[0].id == delivery_id(three.id, "shape")
    assert (letters[0].attempts, letters[0].last_error) == (2, "jq: error")


async def test_a_transform_commit_that_raises_writes_nothing(backend: Outbox) -> None:
    await ingest(backend, 1, sinks=())
    (one,) = await backend.read_events(["hooks"], 0, 100)
    bad = StoredEvent(one.seq, one.id, one.stream, one.payload, one.trace)
    with pytest.raises(Exception):  # noqa: B017, PT011 - any error; the point is that nothing is written
        await backend.commit_transform("shape", one.seq, [Derived(bad, 0, b"1")], [], [object()], wake=["x"])  # type: ignore[list-item]
    assert await backend.cursor("shape") == 0
    assert await backend.read_events(["shape"], 0, 100) == []


async def test_retried_transform_dead_letters_come_back_and_commit(backend: Outbox) -> None:
    await ingest(backend, 1, 2, sinks=())
    one, two = await backend.read_events(["hooks"], 0, 100)
    await backend.commit_transform("shape", two.seq, [], [(one, "boom"), (two, "boom")], ["crm"])
    assert await backend.revived("shape", 10) == []
    retried = await backend.retry_dead(DeadFilter(stages=["shape"]))
    assert retried == {"shape": 2}
    rows = await backend.revived("shape", 10)
    assert [r.event.id for r in rows] == [one.id, two.id]
    await backend.commit_revived("shape", rows[0], [Derived(one, 0, b'"x"')], None, ["crm"])
    await backend.commit_revived("shape", rows[1], [], "still bad", ["crm"])
    assert await backend.revived("shape", 10) == []
    assert [d.id for d in await backend.due_deliveries("crm", FAR, 10)] == [
        delivery_id(derived_id(one.id, "shape", 0), "crm")
    ]
    total, letters = await backend.list_dead(DeadFilter(stages=["shape"]), 10)
    assert total == 1
    assert letters[0].last_error == "still bad"


async def test_heads_count_the_attempts_at_the_same_place(backend: Outbox) -> None:
    assert await backend.read_head("shape") is None
    first = await backend.attempt_head("shape", 5, 9)
    again = await backend.attempt_head("shape", 5, 7)
    assert (first.attempts, again.attempts, again.until) == (1, 2, 9)
    assert await backend.read_head("shape") == again
    assert (await backend.attempt_head("shape", 10, 10)).attempts == 1


async def test_a_sink_head_seen_by_too_many_incarnations_is_quarantined(backend: Outbox) -> None:
    (first, _) = await ingest(backend, 1, 2)
    assert await backend.quarantine_head("crm", 2) is None
    assert await backend.quarantine_head("crm", 2) is None
    found = await backend.quarantine_head("crm", 2)
    assert found is not None
    due, crashes = found
    assert due.id == delivery_id(first, "crm")
    assert crashes == 2
    assert [d.event_id for d in await backend.due_deliveries("crm", FAR, 10)] != [first]
    total, letters = await backend.list_dead(DeadFilter(), 10)
    assert total == 1
    assert "quarantined" in (letters[0].last_error or "")


# -- deliveries and outcomes -------------------------------------------------------------------


async def test_outcomes_deliver_reschedule_and_dead_letter(backend: Outbox) -> None:
    ids = await ingest(backend, 1, 2, 3)
    due = await backend.due_deliveries("crm", FAR, 100)
    assert [d.event_id for d in due] == ids
    assert [d.id for d in due] == [delivery_id(i, "crm") for i in ids]
    assert [d.payload for d in due] == [b"1", b"2", b"3"]
    assert all(d.attempts == 0 for d in due)
    later = time.time() + 600
    outcomes = Outcomes(
        [(due[0].rowid, 200)], [(due[1].rowid, later, 503, "busy")], [(due[2].rowid, 400, "bad")]
    )
    await backend.record_outcomes([(outcomes, 0.01, "ok")], wake=["crm"])
    assert await backend.due_deliveries("crm", time.time() + 1, 100) == []
    assert await backend.next_due_after("crm", time.time()) == pytest.approx(later)
    (retry,) = await backend.due_deliveries("crm", later, 100)
    assert (retry.id, retry.attempts) == (due[1].id, 1)
    assert (await backend.counts())["crm"] == {"pending": 1, "delivered": 1, "dead": 1}
    assert await backend.pending_total() == 1
    assert await backend.pending_by_stage(["crm", "erp"]) == {"crm": 1, "erp": 0}
    assert await backend.due_counts(["crm"], time.time()) == {"crm": 0}
    assert len(await backend.delivery_latencies("crm")) == 1
    failures = await backend.error_counts()
    assert {(f[0], f[1], f[2]) for f in failures} == {("crm", "retrying", 503), ("crm", "dead", 400)}


async def test_renewing_claims_keeps_the_pending_rows_and_lets_finished_ones_go(backend: Outbox) -> None:
    await ingest(backend, 1, 2, 3)
    due = await backend.due_deliveries("crm", FAR, 100)
    await backend.record_outcomes([(Outcomes([(due[0].rowid, 200)], [], []), 0.01, "ok")])
    rowids = [d.rowid for d in due]
    assert await backend.renew_claims("crm", rowids) == set(rowids[1:])
    assert await backend.renew_claims("erp", rowids) == set(), "another stage's rows are not its"
    assert await backend.renew_claims("crm", []) == set()
    # SQLite: one process, claims never lapse; PostgreSQL: a fetched row has half a lease left.
    expected = None if isinstance(backend, Store) else 30.0
    assert backend.claim_lease == expected


async def test_parked_deliveries_are_made_due(backend: Outbox) -> None:
    await ingest(backend, 1)
    (due,) = await backend.due_deliveries("crm", FAR, 10)
    await backend.record_outcomes([(Outcomes([], [(due.rowid, 1e12, 503, "later")], []), None, None)])
    assert await backend.unpark("crm", time.time(), 3600) == 1
    assert [d.id for d in await backend.due_deliveries("crm", time.time() + 1, 10)] == [due.id]


async def test_dead_letters_list_show_retry_and_purge(backend: Outbox) -> None:
    ids = await ingest(backend, {"n": 1}, {"n": 2}, {"n": 3})
    due = await backend.due_deliveries("crm", FAR, 100)
    await backend.record_outcomes(
        [(Outcomes([], [], [(d.rowid, 500, f"error {n}") for n, d in enumerate(due)]), None, None)]
    )
    total, letters = await backend.list_dead(DeadFilter(), 2)
    assert total == 3
    assert len(letters) == 2
    found = await backend.show_delivery(delivery_id(ids[0], "crm"))
    assert found is not None
    assert found[0] == "dead"
    assert found[1].payload == {"n": 1}
    assert await backend.show_delivery("nope") is None
    assert (await backend.list_dead(DeadFilter(error="ERROR 1"), 10))[0] == 1
    assert await backend.retry_dead(DeadFilter(ids=[delivery_id(ids[0], "crm")]), wake=["crm"]) == {"crm": 1}
    assert [d.id for d in await backend.due_deliveries("crm", FAR, 10)] == [delivery_id(ids[0], "crm")]
    assert await backend.purge_dead(DeadFilter(), dry_run=True) == 2
    assert await backend.purge_dead(DeadFilter()) == 2
    assert (await backend.list_dead(DeadFilter(), 10))[0] == 0


async def test_replay_makes_new_deliveries_with_numbered_ids(backend: Outbox) -> None:
    ids = await ingest(backend, 1, 2)
    selected = await backend.replay_selection(source="hooks", since=None, until=None, streams=["hooks"])
    assert [stream for _, stream in selected] == ["hooks", "hooks"]
    number = await backend.start_replay(source="hooks", since=None, until=None, sinks=["crm"])
    created = await backend.insert_replay(
        number=number, seqs_by_sink={"crm": [seq for seq, _ in selected]}, wake=["crm"]
    )
    assert created == {"crm": 2}
    due = {d.id for d in await backend.due_deliveries("crm", FAR, 10)}
    assert {delivery_id(i, "crm") + f".r{number}" for i in ids} <= due


async def test_an_event_reports_its_deliveries(backend: Outbox) -> None:
    (event_id,) = await ingest(backend, {"a": 1})
    report = await backend.event_outcomes(event_id)
    assert report is not None
    assert await backend.event_outcomes("0" * 27) is None


# -- polling -----------------------------------------------------------------------------------


async def test_poll_state_and_page_checks_round_trip(backend: Outbox) -> None:
    assert await backend.load_poll_state("api") == PollState()
    state = PollState(mark="m", etag='"e"', next_url="https://x/2", pages=2, cycles=3, refreshed=1.5)
    await backend.save_poll_state("api", state)
    assert await backend.load_poll_state("api") == state
    assert await backend.load_page_checks("api") == {}
    check = PageCheck(1, "https://x/1", '"e"', None, "https://x/2", "m", 2.0)
    committed = await backend.commit_pages(
        "api", [(["k1", "k2"], [b"1", b"2"], state)], ["crm"], dedup_window=3600, checks=[check], wake=["crm"]
    )
    assert [len(c.events) for c in committed] == [2]
    assert committed[0].duplicates == 0
    assert await backend.load_page_checks("api") == {1: check}
    later = PollState(mark="n")
    again = await backend.commit_pages(
        "api", [(["k2", "k3"], [b"2", b"3"], state), (["k3"], [b"3"], later)], ["crm"], dedup_window=3600
    )
    assert [(len(c.events), c.duplicates) for c in again] == [(1, 1), (0, 1)]
    assert await backend.load_poll_state("api") == later
    events = await backend.read_events(["api"], 0, 10)
    assert [e.payload for e in events] == [b"1", b"2", b"3"]
    due = await backend.due_deliveries("crm", FAR, 10)
    assert [d.id for d in due] == [delivery_id(e.id, "crm") for e in events]


# -- windows -----------------------------------------------------------------------------------


async def test_windows_join_emit_and_dead_letter(backend: Outbox) -> None:
    await ingest(backend, 1, 2, sinks=())
    one, two = await backend.read_events(["hooks"], 0, 10)
    w1, w2 = Window(1, "a", 100.0, None, 1), Window(2, "b", 100.0, None, 1)
    joined = [
        Joined(1, 1, derived_id(one.id, "sum", 0), b"1", None),
        Joined(2, 1, derived_id(two.id, "sum", 0), b"2", None),
    ]
    await backend.commit_joined("sum", two.seq, joined, [w1, w2], [])
    assert await backend.cursor("sum") == two.seq
    assert await backend.stored_windows("sum") == [(1, "a", 100.0, 1), (2, "b", 100.0, 1)]
    contents = await backend.window_contents("sum", [1, 2])
    assert contents == {1: [(joined[0].id, b"1", None)], 2: [(joined[1].id, b"2", None)]}
    stored = await backend.commit_emitted(
        "sum",
        [
            Emitted(1, joined[0].id, b"10", None, ["crm"]),
            Emitted(2, joined[1].id, None, None, (), "jq: no", b"[2]"),
        ],
        wake=["crm"],
    )
    assert stored == 1
    assert await backend.stored_windows("sum") == []
    assert [d.id for d in await backend.due_deliveries("crm", FAR, 10)] == [delivery_id(joined[0].id, "crm")]
    total, letters = await backend.list_dead(DeadFilter(stages=["sum"]), 10)
    assert total == 1
    assert letters[0].id == delivery_id(joined[1].id, "sum")
    assert letters[0].last_error == "jq: no"


# -- control, state, maintenance ---------------------------------------------------------------


async def test_audit_rows_come_back_oldest_first(backend: Outbox) -> None:
    for n in range(3):
        await backend.record_audit(uid=1000, pid=n, command=f"c{n}", arguments="{}", outcome="ok")
    rows = await backend.read_audit(2)
    assert [(r.command, r.pid, r.uid) for r in rows] == [("c1", 1, 1000), ("c2", 2, 1000)]


async def test_alert_states_round_trip_and_forget_removed_rules(backend: Outbox) -> None:
    assert await backend.load_alert_states() == {}
    states = {"slow": AlertState(state="firing", since=1.0, fired=2), "dead": AlertState()}
    await backend.save_alert_states(states, frozenset(states))
    assert await backend.load_alert_states() == states
    await backend.save_alert_states({"slow": states["slow"]}, frozenset({"slow"}))
    assert await backend.load_alert_states() == {"slow": states["slow"]}


async def test_refresh_tokens_round_trip(backend: Outbox) -> None:
    assert await backend.load_refresh_token("sinks.crm") is None
    await backend.save_refresh_token("sinks.crm", "r1", "seed")
    await backend.save_refresh_token("sinks.crm", "r2", "seed")
    assert await backend.load_refresh_token("sinks.crm") == ("r2", "seed")
    assert await backend.load_refresh_token("sinks.erp") is None


async def test_transform_backlog_counts_unread_events(backend: Outbox) -> None:
    await ingest(backend, 1, 2, 3, sinks=())
    one, _, _ = await backend.read_events(["hooks"], 0, 10)
    await backend.commit_transform("shape", one.seq, [], [], [])
    assert await backend.transform_backlog({"shape": ["hooks"], "new": ["hooks"]}) == {"shape": 2, "new": 3}


async def test_prune_removes_what_nothing_needs(backend: Outbox) -> None:
    await ingest(backend, 1, 2)
    first, second = await backend.due_deliveries("crm", FAR, 10)
    await backend.record_outcomes([(Outcomes([(first.rowid, 200)], [], []), None, None)])
    await backend.record_audit(uid=None, pid=None, command="c", arguments="{}", outcome="ok")
    # Retention in the past: every finished row is old enough. The pending delivery keeps its event.
    removed = await backend.prune(
        retention=-60, archive=-60, dedup_window=3600, readers={"hooks": []}, audit_retention=-60
    )
    assert removed >= 3  # the delivered row, its event, the audit row
    assert [e.payload for e in await backend.read_events(["hooks"], 0, 10)] == [b"2"]
    assert [d.id for d in await backend.due_deliveries("crm", FAR, 10)] == [second.id]
    assert await backend.read_audit(10) == []


# -- per-key ordering ----------------------------------------------------------------------------


def ordered(compare: str = "number", *, coalesce: bool = False) -> Ordering:
    return Ordering(OrderingConfig(key=".k", version=".v", compare=compare, coalesce=coalesce))  # type: ignore[arg-type]


async def test_ordered_fetches_give_each_keys_lowest_version_and_settle_stale_ones(backend: Outbox) -> None:
    order = ordered()
    await ingest(backend, {"k": "a", "v": 2}, {"k": "a", "v": 1}, {"k": "b", "v": 5}, {"k": 7, "v": "x"})
    fetched = await backend.due_ordered(order, "crm", FAR, 10)
    assert sorted(msgspec.json.decode(d.payload)["v"] for d in fetched.rows) == [1, 5]
    assert fetched.dead == 1
    assert "ordering: version .v of key 7 is not a number" in fetched.dead_letters[0][1]
    a1 = next(d for d in fetched.rows if msgspec.json.decode(d.payload)["k"] == "a")
    await backend.record_outcomes([(Outcomes([(a1.rowid, 200)], [], []), None, None)], ordering=order)
    (a2,) = [d for d in (await backend.due_ordered(order, "crm", FAR, 10)).rows if b'"a"' in d.payload]
    assert msgspec.json.decode(a2.payload)["v"] == 2
    await backend.record_outcomes([(Outcomes([(a2.rowid, 200)], [], []), None, None)], ordering=order)
    # A version older than the delivered one is never sent: it turns stale, with the reason.
    await ingest(backend, {"k": "a", "v": 1.5})
    fetched = await backend.due_ordered(order, "crm", FAR, 10)
    assert [msgspec.json.decode(d.payload)["k"] for d in fetched.rows] == ["b"]
    assert fetched.stale == 1
    report = await backend.event_outcomes(fetched.stale_ids[0].rsplit(".", 1)[0])
    assert report is not None
    (delivery,) = report.events[0].deliveries
    assert delivery.state == "stale"
    assert delivery.error is not None
    assert delivery.error.startswith("stale: version 1.5 is older than 2")


async def test_coalescing_sends_only_the_newest_pending_version(backend: Outbox) -> None:
    order = ordered("string", coalesce=True)
    await ingest(
        backend, {"k": "a", "v": "2026-01-02"}, {"k": "a", "v": "2026-01-03"}, {"k": "a", "v": "2026-01-01"}
    )
    fetched = await backend.due_ordered(order, "crm", FAR, 10)
    assert [msgspec.json.decode(d.payload)["v"] for d in fetched.rows] == ["2026-01-03"]
    assert fetched.stale == 2
