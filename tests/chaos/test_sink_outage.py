"""Long sink outage: the sink is down while events pile up; memory stays flat, nothing dies early.

1. The sink's receiver is down (connection refused) while EVENTS webhooks arrive; the daemon's RSS
   is sampled throughout (target: at most 150 MB). The sink has a circuit breaker, as a sink
   expected to ride out long outages should: once it is open, deliveries wait in the store
   instead of being retried one by one (docs/reliability.md has the figures without one).
   At full size RSS must also be flat: its peak may grow by at most FLAT_MARGIN_MB from a
   quarter of the backlog to all of it, once that quarter is past the warm-up (FLAT_FROM
   events: the page cache and the span queue, which fills with no collector, are full by then);
   tests/chaos/test_outage_memory.py checks the same at a short size in make test.
2. Nothing is dead-lettered: the retry policy (1000 attempts, a day) has not run out.
3. The daemon is restarted with the whole backlog pending: SIGTERM, then start to READY (target:
   at most 2 s, measured from the spawn to the `ready` log line). At full size (`make chaos`, run
   on a quiet machine) the wall-clock time is held to it; the short version in `make test` holds
   the CPU time the new process used until ready to it, which other processes on a busy machine
   do not inflate (wall-clock took 7.5 s there under a 2x-overloaded suite).
4. The receiver comes back: the backlog drains. The drain is compared with a baseline measured
   in the same run: a backlog of the same size built while the sink is paused (`ferry ctl
   pause`), which drains on `resume` with no retry schedule to wait for. A retried delivery
   waits for its next attempt (at most `max_backoff` after the last failure, full jitter), so
   the outage drain may take up to `max_backoff` longer; beyond that it must be as fast.
5. Every event arrives exactly once; the store passes `PRAGMA integrity_check`.

Short (make test): 5,000 events. Full (make chaos): 1,000,000 events (`FERRY_CHAOS_EVENTS=N`
overrides the count).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import msgspec
import trio

from daemon.store.schema import DEAD, PENDING
from tests.chaos.load import FULL, RssSampler, cpu_s, post_until_acked
from tests.fakes import Daemon, FakeReceiver, Received, Reply, ctl, free_port, ok, write_config

EVENTS = int(os.environ.get("FERRY_CHAOS_EVENTS") or (1_000_000 if FULL else 5_000))
RSS_LIMIT_MB = 150.0
FLAT_MARGIN_MB = 10.0  # peak growth allowed while the backlog goes from a quarter to all of EVENTS
FLAT_FROM = 200_000  # warmed up: the page cache, and the span queue (no collector here) at 5 % sampling
READY_LIMIT_S = 2.0
MAX_BACKOFF_S = 30.0 if FULL else 2.0  # the drain may wait this long for the first retry

PIPELINE = """
[telemetry]
metrics = false

[control]
socket = "{sock}"

[sources.demo]
type = "webhook"

[sinks.out]
type = "http"
inputs = ["demo"]
url = "http://127.0.0.1:{port}/batch"
concurrency = 4
batch = { max_items = 200, max_wait = "5ms" }
breaker = { failures = 5, cool_down = "1s" }

[sinks.out.retry]
max_attempts = 1000
max_age = "1d"
initial_backoff = "500ms"
max_backoff = "{max_backoff}s"
"""


class Items:
    """Counts the items of each JSON array the receiver gets, with the time of each request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[int, int] = {}
        self.times: list[tuple[float, int]] = []

    def __call__(self, request: Received) -> Reply:
        items = msgspec.json.decode(request.body)
        with self.lock:
            for item in items:
                self.seen[item["n"]] = self.seen.get(item["n"], 0) + 1
            self.times.append((time.monotonic(), len(items)))
        return ok(request)

    def total(self) -> int:
        with self.lock:
            return sum(count for _, count in self.times)

    def reset(self) -> None:
        with self.lock:
            self.times.clear()

    def last(self) -> float:
        with self.lock:
            return self.times[-1][0]


def counts(db: Path) -> dict[int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())


async def wait_items(items: Items, total: int, limit_s: float) -> None:
    with trio.fail_after(limit_s):
        while items.total() < total:
            await trio.sleep(0.05)


def body(n: int) -> bytes:
    return msgspec.json.encode({"n": n, "name": "Ada Lovelace", "email": f"ada{n}@example.com"})


async def test_a_long_sink_outage_keeps_memory_flat_and_drains_at_full_speed(
    tmp_path: Path, sock_dir: Path
) -> None:
    port, listen = free_port(), free_port()
    config = write_config(
        tmp_path,
        PIPELINE.replace("{port}", str(port))
        .replace("{sock}", str(sock_dir / "ferry.sock"))
        .replace("{max_backoff}", f"{MAX_BACKOFF_S:g}"),
        port=listen,
    )
    log = tmp_path / "ferry.log"
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, log).start()
    items = Items()
    receiver: FakeReceiver | None = None
    limit_s = 3600 if FULL else 120
    try:
        with RssSampler(lambda: daemon.proc.pid if daemon.proc else 0) as rss:
            began = time.monotonic()
            warm = EVENTS // 4
            await post_until_acked(lambda: ("127.0.0.1", listen), body, warm, keyed=False, deadline_s=limit_s)
            warm_peak = rss.peak
            await post_until_acked(
                lambda: ("127.0.0.1", listen),
                lambda n: body(warm + n),
                EVENTS - warm,
                keyed=False,
                deadline_s=limit_s,
            )
            ingest_rate = EVENTS / (time.monotonic() - began)
            backlog_peak = rss.peak
            daemon.wait_log(lambda line: line.get("msg") == "delivery will be retried")
            outage = counts(db)
            assert outage.get(DEAD, 0) == 0, "dead-lettered before the retry policy ran out"
            assert outage.get(PENDING) == EVENTS

            daemon.signal(signal.SIGTERM)
            daemon.wait(30)
            began = time.monotonic()
            daemon = Daemon(config, log).start()
            ready_s = time.monotonic() - began
            assert daemon.proc is not None
            ready_cpu_s = cpu_s(daemon.proc.pid)  # read once ready: at least what getting ready cost

            back = time.monotonic()
            receiver = FakeReceiver(items).start(port)
            await wait_items(items, EVENTS, limit_s)
            outage_s = items.last() - back
        peak = rss.peak

        # Baseline: the same backlog, built while the sink is paused, drained on resume.
        assert ctl(config, "pause", "out").returncode == 0
        await post_until_acked(
            lambda: ("127.0.0.1", listen), lambda n: body(EVENTS + n), EVENTS, keyed=False, deadline_s=limit_s
        )
        items.reset()
        resumed = time.monotonic()
        assert ctl(config, "resume", "out").returncode == 0
        await wait_items(items, EVENTS, limit_s)
        paused_s = items.last() - resumed
    finally:
        daemon.stop()
        if receiver is not None:
            receiver.stop()

    assert sorted(items.seen) == list(range(2 * EVENTS)), "an event was lost"
    assert set(items.seen.values()) == {1}, "an event was delivered twice without a crash"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    print(
        f"\nsink outage, {EVENTS} events (ingest {ingest_rate:.0f}/s): RSS peak {peak:.0f} MB "
        f"({warm_peak:.0f} MB with {warm} pending, {backlog_peak:.0f} MB with {EVENTS}); 0 dead; "
        f"restart to ready {ready_s:.2f}s ({ready_cpu_s:.2f}s of CPU) with the backlog; "
        f"drained in {outage_s:.1f}s "
        f"({EVENTS / outage_s:.0f}/s) after the outage vs {paused_s:.1f}s ({EVENTS / paused_s:.0f}/s) "
        f"after a pause (max_backoff {MAX_BACKOFF_S:g}s)"
    )
    assert peak <= RSS_LIMIT_MB
    if warm >= FLAT_FROM:  # flat: the backlog quadrupled after the warm-up
        assert backlog_peak - warm_peak <= FLAT_MARGIN_MB, "RSS grows with the backlog"
    assert (ready_s if FULL else ready_cpu_s) <= READY_LIMIT_S
    assert outage_s <= MAX_BACKOFF_S + 1.5 * paused_s + 1.0
