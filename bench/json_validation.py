"""What validating a webhook body costs, three ways (issue 14; docs/architecture.md records the decision).

    .venv/bin/python -m bench.json_validation [--runs 5]

- `full decode`: `msgspec.json.decode(body)`, what the listener does: checks syntax, UTF-8 and
  number range, and builds the Python objects it then drops;
- `Raw skip`: `msgspec.json.decode(body, type=msgspec.Raw)`: syntax only (invalid UTF-8 inside a
  string and out-of-range numbers pass it), builds nothing;
- `Raw skip + checks`: the Raw skip plus the checks it leaves out, in Python: UTF-8 (`isascii` or
  `decode`) and a regex for exponents or long digit runs outside strings (a full decode when one
  is found). The cheapest correct path is whichever of the first and the third is faster.

Each figure is the best of `--runs` runs, in µs per body.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

_full = msgspec.json.Decoder().decode
_raw = msgspec.json.Decoder(msgspec.Raw).decode
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SUSPECT = re.compile(rb"[0-9][eE]|[0-9]{309}")


def _raw_and_checks(body: bytes) -> None:
    _raw(body)
    if not body.isascii():
        body.decode()
    if _SUSPECT.search(body) is not None and _SUSPECT.search(_STRINGS.sub(b"", body)) is not None:
        _full(body)


def bodies() -> dict[str, bytes]:
    rng = random.Random(14)
    small = {"id": "evt_1", "type": "invoice.paid", "amount": 4200, "currency": "eur"}
    user = {"login": "octocat", "id": 1, "node_id": "MDQ6VXNlcjE=", "site_admin": False}
    label = {"id": 208045946, "name": "bug", "color": "f29513", "default": True}
    github = {
        "action": "opened",
        "number": 1347,
        "pull_request": {
            "id": 1,
            "title": "Amazing new feature",
            "user": user,
            "body": "Please pull these awesome changes " * 10,
            "labels": [label] * 5,
            "created_at": "2011-01-26T19:01:12Z",
            "commits": 3,
        },
        "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "topics": ["a", "b", "c"]},
        "sender": user,
    }
    rows = [
        {"id": n, "sku": f"SKU-{n:06d}", "price": rng.random() * 100, "qty": rng.randint(1, 9), "name": "ünï"}
        for n in range(1000)
    ]
    return {
        name: json.dumps(value).encode()
        for name, value in (("small", small), ("github", github), ("rows", rows))
    }


def measure(runs: int) -> list[tuple[str, int, dict[str, float]]]:
    ways: dict[str, Callable[[bytes], Any]] = {
        "full decode": _full,
        "Raw skip": _raw,
        "Raw skip + checks": _raw_and_checks,
    }
    results = []
    for name, body in bodies().items():
        number = 20_000 if len(body) < 5000 else 200
        figures = {
            way: min(timeit.repeat(partial(fn, body), number=number, repeat=runs)) / number * 1e6
            for way, fn in ways.items()
        }
        results.append((name, len(body), figures))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    for name, size, figures in measure(args.runs):
        cells = ", ".join(f"{way} {us:.2f} µs" for way, us in figures.items())
        print(f"{name} ({size} bytes): {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
