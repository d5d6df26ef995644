"""Memory during a sink outage does not depend on the size of the backlog.

The sink's receiver is down (connection refused; a circuit breaker, as in test_sink_outage.py)
while WARM events arrive, then 3 x WARM more. The backlog quadruples; the daemon's peak RSS
(VmHWM) after the warm-up may grow by at most GROWTH_LIMIT_MB. Pending rows live on disk;
what the daemon holds in memory is bounded: SQLite's page cache (`daemon.store.sqlite.PAGE_CACHE_KIB`,
which is what grew with the backlog before it was cut from 32 MiB to 4 MiB), the sink's
read-ahead, and the span queue (`[telemetry] max_queue`, here 256: with no collector it fills
up, and its warm-up is a matter of traffic, not of backlog; docs/reliability.md has its cost).

Short (make test): 20,000 then 80,000 events. Full (make chaos): 50,000 then 200,000.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from daemon.store.schema import DEAD, PENDING
from tests.chaos.load import FULL, post_until_acked
from tests.chaos.test_sink_outage import PIPELINE, body
from tests.fakes import Daemon, free_port, write_config

WARM = int(os.environ.get("FERRY_CHAOS_MEMORY_EVENTS") or (50_000 if FULL else 20_000))
GROWTH_LIMIT_MB = 8.0
"""Measured +3-5 MB: the 4 MiB page cache fills up by ~25,000 events, then RSS moves by 1-2 MB (malloc's
free lists); the old 32 MiB cache grew +17 MB from 12,500 to 50,000 events."""


def status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def pending(db: Path) -> dict[int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())


async def test_rss_does_not_grow_with_the_backlog_of_a_sink_outage(tmp_path: Path, sock_dir: Path) -> None:
    port = free_port()  # nothing listens on `port`: the sink is down
    config = write_config(
        tmp_path,
        PIPELINE.replace("{port}", str(port))
        .replace("{sock}", str(sock_dir / "ferry.sock"))
        .replace("{max_backoff}", "30")
        .replace("metrics = false", "metrics = false\nmax_queue = 256"),
    )
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        host, _, bound = daemon.address.rpartition(":")
        address = (host, int(bound))
        await post_until_acked(lambda: address, body, WARM, keyed=False, deadline_s=600)
        daemon.wait_log(lambda line: line.get("msg") == "delivery will be retried")
        warm_mb = status_mb(pid, "VmHWM")
        more = 3 * WARM
        await post_until_acked(lambda: address, lambda n: body(WARM + n), more, keyed=False, deadline_s=600)
        full_mb = status_mb(pid, "VmHWM")
        rss_mb = status_mb(pid, "VmRSS")
    finally:
        daemon.stop()

    states = pending(db)
    assert states.get(DEAD, 0) == 0
    assert states.get(PENDING) == 4 * WARM, states
    print(
        f"\nsink outage memory: peak RSS {warm_mb:.1f} MB with {WARM} pending, {full_mb:.1f} MB "
        f"(now {rss_mb:.1f}) with {4 * WARM} pending: +{full_mb - warm_mb:.1f} MB"
    )
    assert full_mb - warm_mb <= GROWTH_LIMIT_MB, "RSS grows with the backlog"
