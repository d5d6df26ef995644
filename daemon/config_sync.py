"""Config tables for keeping other systems in sync: a sink's per-key `ordering`
(docs/enrichment-and-ordering.md).

`check_ordering` is the part of `ferry check` that needs more than types: jq programs that compile.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import jq
from msgspec import Meta

from .config_base import Section


class OrderingConfig(Section, frozen=True):
    """Per-key ordering and conflict resolution: a newer version of a record is never overwritten.

    Deliveries with the same `key` leave one at a time, lowest `version` first; a key whose
    delivery is failing holds back only its own later deliveries. A delivery whose version is
    lower than the last one delivered for its key is dropped as `stale` (counted, never sent).
    """

    key: Annotated[
        str,
        Meta(min_length=1, description="jq expression giving a delivery's record key (e.g. `.email`)."),
    ]
    version: Annotated[
        str,
        Meta(
            min_length=1,
            description="jq expression giving the record's version (e.g. `.updated_at`); compared per key.",
        ),
    ]
    compare: Annotated[
        Literal["number", "rfc3339", "string"],
        Meta(
            description="How versions compare: `number` (JSON number or numeric string), `rfc3339` "
            "(timestamps with a zone, compared as instants to the microsecond), `string` (code points)."
        ),
    ] = "number"


def check_ordering(where: str, ordering: OrderingConfig) -> Iterator[str]:
    """Errors in a sink's `ordering`: its jq expressions must compile."""
    for key in ("key", "version"):
        yield from _jq_error(f"{where}.ordering.{key}", getattr(ordering, key))


def _jq_error(where: str, program: str, shown: str | None = None) -> Iterator[str]:
    try:
        jq.compile(program)
    except ValueError as exc:
        yield f"{where}: invalid jq program {shown or program!r}: {exc}"
