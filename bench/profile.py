"""Sum py-spy's collapsed stacks (`py-spy record --format raw`) per function.

    .venv/bin/python -m bench.profile FILE [--top N] [--match TEXT]

Prints each function's share of the samples: *self* (it was the innermost frame) and
*total* (it was anywhere on the stack, counted once per sample), highest total first.
With `--match`, only functions whose name or file contains TEXT.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, self counts, total counts) per frame `function (file)` of a raw py-spy file."""
    samples = 0
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(frame) for frame in stack.split(";")]
        samples += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return samples, own, total


def _frame(frame: str) -> str:
    """`name (path/to/file.py:LINE)` -> `name (file.py)`: lines merged, so a function counts once."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="")
    parser.add_argument("--self", action="store_true", help="order by self time")
    args = parser.parse_args(argv)
    samples, own, total = summarise(args.file)
    order = own if args.self else total
    print(f"{samples} samples; % of samples: self, total")
    shown = 0
    for frame, _ in order.most_common():
        if args.match and args.match not in frame:
            continue
        print(f"{own[frame] / samples:7.1%} {total[frame] / samples:7.1%}  {frame}")
        shown += 1
        if shown >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
