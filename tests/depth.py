"""How hard the property tests search.

`make test` runs the CI-sized counts each test names (seconds in all). `FERRY_HYPOTHESIS=deep`
(`make deep`) runs every property test with 25 times as many examples, for a longer search before
a release or after changing a parser.
"""

from __future__ import annotations

import os

FACTOR = 25 if os.environ.get("FERRY_HYPOTHESIS", "").strip().lower() == "deep" else 1


def examples(ci: int) -> int:
    """`ci` examples in the normal suite; `FACTOR` times as many in a deep run."""
    return ci * FACTOR
