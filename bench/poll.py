"""Case 6: polling a paginated API into the store, against a bare httpx loop reading the same API.

The fake upstream (`tests.fake_api`) runs in a process of its own and serves N records in
pages of 100 (cursor paging). The baseline is the least any poller must do: one httpx
client on trio fetching page after page and decoding each (to find the next cursor), in
this process. Then `ferry run` polls the same listing with a poll source (no sinks, so
the figure is ingest: every record stored durably with its key, `durability = "full"`),
timed from READY to the moment the store holds all N records (read every 20 ms). The
baseline runs before and after each ferry round; the ratio is of the medians.

    .venv/bin/python -m bench.poll [--records N]     # this case alone (default 100,000)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry
from bench.report import Row

TARGET = 0.7
PAGE = 100

CONFIG = """
[store]
path = "{folder}/ferry.db"
durability = "full"

[listener]
address = "127.0.0.1:0"

[control]
socket = "{folder}/ferry.sock"

[telemetry]
metrics = false

[sources.api]
type = "poll"
url = "{url}/cursor/items?limit={page}"
items = ".data"
key = ".id"
interval = "1h"
max_pages = {pages}
pagination = {{ style = "cursor", path = ".next_cursor" }}
since = {{ field = ".updated_at", param = "updated_since", overlap = "1m" }}
"""


class FakeApiProcess:
    """`python -m tests.fake_api` in a child process; `url` once it is serving."""

    def __init__(self, records: int) -> None:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_api", "--records", str(records), "--page-size", str(PAGE)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError(f"the fake API did not start: {self.url!r}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def bare_loop(url: str) -> tuple[int, float]:
    """(records, seconds): every page through one httpx client, decoded to follow the cursor."""
    records = 0
    params: dict[str, str | int] = {"limit": PAGE}
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        while True:
            page = (await client.get(f"{url}/cursor/items", params=params)).json()
            records += len(page["data"])
            if not page["next_cursor"]:
                break
            params["cursor"] = page["next_cursor"]
        return records, time.perf_counter() - started


async def poll_ingest(ctx: Context, records: int | None = None) -> None:
    count = records or (10_000 if ctx.quick else 100_000)
    api = FakeApiProcess(count)
    baselines: list[float] = []
    rates: list[float] = []
    try:
        got, seconds = await bare_loop(api.url)  # warms the fake API up too
        baselines.append(got / seconds)
        for round_ in range(ctx.rounds):
            rates.append(await _ferry_round(ctx, api.url, count, round_))
            got, seconds = await bare_loop(api.url)
            baselines.append(got / seconds)
    finally:
        api.close()
    rate, baseline = statistics.median(rates), statistics.median(baselines)
    ctx.details["poll"] = {"records": count, "ferry_per_s": rates, "baselines_per_s": baselines}
    ctx.rows.append(
        Row(
            f"polling {count:,} records (pages of {PAGE}) into the store",
            rate,
            "records/s",
            baseline=baseline,
            ratio=rate / baseline,
            target=f">= {TARGET}x a bare httpx loop",
            passed=rate / baseline >= TARGET,
        )
    )


async def _ferry_round(ctx: Context, url: str, count: int, round_: int) -> float:
    """One `ferry run` on a fresh store: records/s from READY until all `count` are stored."""
    folder = ctx.tmp / f"poll-{round_}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "ferry.toml"
    config.write_text(CONFIG.format(folder=folder, url=url, page=PAGE, pages=count // PAGE + 10))
    ferry = Ferry.start(folder, config, ctx.running)
    try:
        with trio.fail_after(300):
            while (stored := ferry.query("SELECT count(*) FROM events WHERE stream = 'api'")) < count:
                await trio.sleep(0.02)
        elapsed = time.time() - ferry.ready_at
        if round_ == 0:
            ctx.rss_row("polling", ferry)
    finally:
        ferry.stop()
    if stored != count:
        ctx.anomalies.append(f"polling: {stored} records stored for {count} served")
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.poll", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    args = parser.parse_args(argv)
    with bench_context(args.quick, prefix="ferry-bench-poll-", receiver=False) as ctx:
        trio.run(poll_ingest, ctx, args.records)
    return report(ctx, ctx.rows + ctx.memory)


if __name__ == "__main__":
    sys.exit(main())
