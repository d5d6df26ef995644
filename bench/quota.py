"""Case 7b: requests and quota spent per poll cycle on an unchanged 12-page listing, before/after.

The fake upstream (`tests.fake_api`, in this process: only its counts matter here) serves 1,200
records in pages of 100 (cursor paging) and counts quota as GitHub does: every answer but a 304
spends one. `ferry run` polls it every 100 ms for six cycles — one that reads the listing, five
over the unchanged listing — three ways:

- before: no validator on any page, as ferry sent none after a listing of more than one page
  before per-page validators (reproduced with `conditional = false`, which sends none at all);
- after: each page asked with the validator of its last answer (oldest first);
- after, `newest_first`: the same listing newest first (`direction=desc`), where an unchanged
  first page ends the cycle.

    .venv/bin/python -m bench.quota     # this case alone
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry
from bench.report import Row
from tests.fake_api import ApiRequest, FakeApi

RECORDS, PAGE, IDLE = 1_200, 100, 5

CONFIG = """
[store]
path = "{folder}/ferry.db"

[listener]
address = "127.0.0.1:0"

[control]
socket = "{folder}/ferry.sock"

[telemetry]
metrics = false

[sources.api]
type = "poll"
url = "{url}/cursor/items?limit={page}{order}"
items = ".data"
key = ".id"
interval = "100ms"
jitter = 0
pagination = {{ style = "cursor", path = ".next_cursor" }}
conditional = {conditional}
newest_first = {newest_first}
"""


@dataclass(frozen=True)
class Cycles:
    """What the first cycle and the idle ones after it cost: requests and quota per cycle."""

    first_requests: int
    first_spent: int
    idle_requests: float
    idle_spent: float


def _cycles(requests: list[ApiRequest]) -> list[list[ApiRequest]]:
    cycles: list[list[ApiRequest]] = []
    for request in requests:
        if "cursor" not in request.query:
            cycles.append([])
        if cycles:
            cycles[-1].append(request)
    return cycles


async def _measure(ctx: Context, name: str, *, conditional: bool, newest_first: bool) -> Cycles:
    api = FakeApi(records=RECORDS, page_size=PAGE).start()
    folder = ctx.tmp / f"quota-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "ferry.toml"
    config.write_text(
        CONFIG.format(
            folder=folder,
            url=api.url,
            page=PAGE,
            order="&direction=desc" if newest_first else "",
            conditional=str(conditional).lower(),
            newest_first=str(newest_first).lower(),
        )
    )
    ferry = Ferry.start(folder, config, ctx.running)
    try:
        with trio.fail_after(120):
            while len(_cycles(api.snapshot())) < 2 + IDLE:  # the first, IDLE idle ones, the next begun
                await trio.sleep(0.05)
    finally:
        ferry.stop()
        api.stop()
    first, *idle = _cycles(api.snapshot())[: 1 + IDLE]
    pages = {request.query.get("cursor") for request in first}
    if len(pages) != RECORDS // PAGE:
        ctx.anomalies.append(
            f"quota ({name}): the first cycle asked {len(first)} pages, not {RECORDS // PAGE}"
        )
    return Cycles(
        len(first),
        sum(r.status != 304 for r in first),
        sum(map(len, idle)) / IDLE,
        sum(r.status != 304 for cycle in idle for r in cycle) / IDLE,
    )


async def poll_quota(ctx: Context) -> None:
    before = await _measure(ctx, "before", conditional=False, newest_first=False)
    after = await _measure(ctx, "after", conditional=True, newest_first=False)
    newest = await _measure(ctx, "newest-first", conditional=True, newest_first=True)
    ctx.details["poll_quota"] = {"before": vars(before), "after": vars(after), "newest_first": vars(newest)}
    listing = f"unchanged {RECORDS // PAGE}-page listing"
    total_before = before.first_spent + IDLE * before.idle_spent
    total_after = after.first_spent + IDLE * after.idle_spent
    ctx.rows += [
        Row(
            f"poll: requests per idle cycle, {listing} (before: no validators)",
            after.idle_requests,
            "requests",
            baseline=before.idle_requests,
            ratio=after.idle_requests / before.idle_requests,
            target="info: each page still asked, now conditionally",
        ),
        Row(
            f"poll: quota per idle cycle, {listing} (304s free, as GitHub)",
            after.idle_spent,
            "spent",
            baseline=before.idle_spent,
            ratio=after.idle_spent / before.idle_spent,
            target="0 (every page 304)",
            passed=after.idle_spent == 0,
        ),
        Row(
            f"poll: requests / quota per idle cycle, newest_first {listing}",
            newest.idle_requests,
            "requests",
            baseline=before.idle_requests,
            ratio=newest.idle_requests / before.idle_requests,
            target="1 request, 0 spent",
            passed=newest.idle_requests == 1 and newest.idle_spent == 0,
        ),
        Row(
            f"poll: quota spent in {1 + IDLE} cycles (the first reads the listing)",
            total_after,
            "spent",
            baseline=total_before,
            ratio=total_after / total_before,
            target=f"<= the first cycle's ({after.first_spent:g})",
            passed=total_after <= after.first_spent,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with bench_context(False, prefix="ferry-bench-quota-", receiver=False) as ctx:
        trio.run(poll_quota, ctx)
    return report(ctx, ctx.rows)


if __name__ == "__main__":
    sys.exit(main())
