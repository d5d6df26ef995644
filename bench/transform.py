"""Transform throughput: events/s through a typical jq map in ferry's transformer, against `jq` itself.

    .venv/bin/python -m bench.transform [--events 20000] [--runs 3]

The same events (Salesforce-style contact webhooks, ~600 bytes each) and the same jq program
in the same run:

- ferry: `actors.transform.program.TransformProgram.map` over batches of 1,000 events, as the
  transformer actor runs it (one jq run per batch, outputs encoded, ready to store); the store
  is not included (its group commit is measured by the ingest and drain cases);
- ferry with three `routes`, and with a JSON Schema check (`schema`) in front: what each costs;
- `jq -c PROGRAM` (the jq command, one process over a file of JSON lines, output to
  /dev/null), when `jq` is on PATH; otherwise the row says so and the baseline is the jq
  Python binding run once over the whole text (its raw speed, nothing else).

Figures are events per CPU-second (the median of `--runs` runs): the transform's thread CPU
time for ferry, the child's user + system time (`wait4`) for the jq command. On a machine
shared with other work, wall-clock rates mostly measure the neighbours; CPU time does not.
Wall-clock rates are kept in the details. Ratio = ferry / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jq
import trio

from actors.transform.config import RouteConfig, TransformConfig
from actors.transform.program import TransformProgram
from bench.context import Context
from bench.report import Row

MAP = (
    '{id: .Id, email: (.Email | ascii_downcase), name: (.FirstName + " " + .LastName), '
    "company: .Account.Name, phone: .Phone, updated: .LastModifiedDate, "
    'tags: [.Tags[] | select(. != "internal")]}'
)
FILTER = '.Type != "Spam"'
ROUTES = [
    RouteConfig(when='.company == "Acme"', to=["hubspot"]),
    RouteConfig(when='.email | endswith("@example.org")', to=["crm"]),
    RouteConfig(when=".tags | length > 2", to=["hubspot", "crm"]),
]
SCHEMA = {
    "type": "object",
    "required": ["Id", "Email", "FirstName", "LastName", "LastModifiedDate"],
    "properties": {
        "Id": {"type": "string", "minLength": 18, "maxLength": 18},
        "Email": {"type": "string", "format": "email"},
        "FirstName": {"type": "string"},
        "LastName": {"type": "string"},
        "LastModifiedDate": {"type": "string", "format": "date-time"},
        "Tags": {"type": "array", "items": {"type": "string"}},
    },
}
BATCH = 1000


def events(count: int, seed: int = 7) -> list[bytes]:
    """`count` contact webhooks as JSON, deterministic."""
    rng = random.Random(seed)
    companies = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]
    out = []
    for n in range(count):
        event: dict[str, Any] = {
            "Id": f"003{n:015d}",
            "Type": "Spam" if n % 50 == 0 else "Contact",
            "Email": f"Person{n}@{rng.choice(['example.com', 'example.org'])}",
            "FirstName": rng.choice(["Ada", "Alan", "Grace", "Edsger", "Barbara"]),
            "LastName": rng.choice(["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov"]),
            "Phone": f"+1-555-{n % 10000:04d}",
            "Account": {"Id": f"001{n % 97:015d}", "Name": rng.choice(companies)},
            "LastModifiedDate": f"2026-11-25T{n % 24:02d}:{n % 60:02d}:{(n * 7) % 60:02d}.000Z",
            "Tags": rng.sample(["vip", "internal", "newsletter", "trial", "partner"], k=rng.randint(0, 4)),
            "Description": "x" * rng.randint(100, 300),
        }
        out.append(json.dumps(event, separators=(",", ":")).encode())
    return out


def _ferry(program: TransformProgram, payloads: list[bytes]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of transforming every payload as the transformer does."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for start in range(0, len(payloads), BATCH):
        program.map(payloads[start : start + BATCH])
    return time.thread_time() - cpu, time.perf_counter() - wall


def _jq_cli(path: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the jq command over the file."""
    wall = time.perf_counter()
    with subprocess.Popen(
        ["jq", "-c", f"select({FILTER}) | ({MAP})", str(path)], stdout=subprocess.DEVNULL
    ) as child:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"jq exited with {child.returncode}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - wall


def _jq_binding(text: str) -> tuple[float, float]:
    program = jq.compile(f"select({FILTER}) | ({MAP})")
    cpu, wall = time.thread_time(), time.perf_counter()
    program.input_text(text).all()
    return time.thread_time() - cpu, time.perf_counter() - wall


def measure(count: int, runs: int) -> dict[str, Any]:
    """Events/s of each case (median of `runs`), and which baseline was used."""
    payloads = events(count)
    plain = TransformProgram(TransformConfig(inputs=["sf"], map=MAP, filter=FILTER))
    routed = TransformProgram(
        TransformConfig(inputs=["sf"], map=MAP, filter=FILTER, routes=ROUTES, default_route=["crm"])
    )
    validated = TransformProgram(TransformConfig(inputs=["sf"], map=MAP, filter=FILTER, schema=SCHEMA))
    cli = shutil.which("jq")
    samples: dict[str, list[tuple[float, float]]] = {
        "ferry": [],
        "routes": [],
        "schema": [],
        "binding": [],
        "jq": [],
    }
    with tempfile.TemporaryDirectory(prefix="ferry-bench-transform-") as folder:
        path = Path(folder) / "events.jsonl"
        text = "\n".join(payload.decode() for payload in payloads)
        path.write_text(text + "\n")
        for _ in range(runs):
            samples["ferry"].append(_ferry(plain, payloads))
            samples["routes"].append(_ferry(routed, payloads))
            samples["schema"].append(_ferry(validated, payloads))
            samples["binding"].append(_jq_binding(text))
            if cli is not None:
                samples["jq"].append(_jq_cli(path))
    rates = {name: count / statistics.median(c for c, _ in times) for name, times in samples.items() if times}
    wall = {name: count / statistics.median(w for _, w in times) for name, times in samples.items() if times}
    return {"events": count, "runs": runs, "jq_cli": cli, "rates": rates, "wall_rates": wall}


def rows(result: dict[str, Any]) -> list[Row]:
    rates = result["rates"]
    if "jq" in rates:
        baseline, label = rates["jq"], "events/CPU-s (jq command)"
    else:
        baseline, label = rates["binding"], "events/CPU-s (no jq command here: jq Python binding, raw)"
    table = [
        Row(
            "transform: typical jq map + filter (ferry, batches of 1,000)",
            rates["ferry"],
            "events/CPU-s",
            baseline=baseline,
            ratio=rates["ferry"] / baseline,
            baseline_unit=label,
        ),
        Row(
            "transform: the same + 3 routes",
            rates["routes"],
            "events/CPU-s",
            baseline=rates["ferry"],
            ratio=rates["routes"] / rates["ferry"],
            baseline_unit="events/CPU-s (no routes)",
        ),
        Row(
            "transform: the same + JSON Schema validation",
            rates["schema"],
            "events/CPU-s",
            baseline=rates["ferry"],
            ratio=rates["schema"] / rates["ferry"],
            baseline_unit="events/CPU-s (no schema)",
        ),
    ]
    if "jq" in rates:
        table.append(Row("transform: jq Python binding alone (one run)", rates["binding"], "events/CPU-s"))
    return table


async def transform_throughput(ctx: Context) -> None:
    """The `python -m bench` case: its rows join the run's table (in a thread: it is CPU-bound)."""
    result = await trio.to_thread.run_sync(measure, 5000 if ctx.quick else 50_000, 3 if ctx.quick else 5)
    ctx.rows.extend(rows(result))
    ctx.details["transform"] = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transform", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.events, args.runs)
    for row in rows(result):
        extra = (
            f"  (baseline {row.baseline:,.0f} {row.baseline_unit}, {row.ratio:.2f}x)" if row.baseline else ""
        )
        print(f"{row.figure:<62} {row.value:>10,.0f} {row.unit}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
