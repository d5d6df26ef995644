"""`[sinks.NAME.batch] item_outcomes`: how a batching HTTP sink reads per-item outcomes from an
answer that accepted some items of the batch and refused others (HubSpot's `207 Multi-Status`,
an Elasticsearch bulk answer with `"errors": true`, a JSON:API `errors[]`).

The reading itself is `actors.sink.items`; this module holds the table, the presets (jq
text) and `check_item_outcomes`, the part of `ferry check` that compiles the programs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import jq
from msgspec import Meta

from daemon.config.base import Section

Preset = Literal["hubspot", "jsonapi", "elasticsearch"]

# HubSpot's per-input error categories, as the HTTP status a single request would have had.
# Any other category (an internal error, one HubSpot adds later) reads as 500: retried, so an
# unknown cause is never dead-lettered on the first try, and `retry` still bounds it.
_HUBSPOT_STATUS = (
    '{"VALIDATION_ERROR": 400, "INVALID_EMAIL": 400, "INVALID_PARAMS": 400, "BAD_REQUEST": 400, '
    '"MISSING_SCOPES": 403, "FORBIDDEN": 403, "OBJECT_NOT_FOUND": 404, "NOT_FOUND": 404, '
    '"CONFLICT": 409, "OBJECT_ALREADY_EXISTS": 409, "RATE_LIMITS": 429, "RATE_LIMIT": 429}'
)

PRESETS: dict[str, tuple[str, str | None]] = {
    # HubSpot batch create/update/upsert: `errors[]`, each naming its inputs in
    # `context.objectWriteTraceId` (the multi-status ids the request gave) or `context.ids`.
    # An error that names no input yields an entry naming no item: the answer cannot be read.
    "hubspot": (
        f"{_HUBSPOT_STATUS} as $status | (.errors // [])[] | . as $e"
        " | ($e.context.objectWriteTraceId // $e.context.ids // []) as $ids"
        ' | {status: ($status[$e.category // ""] // 500),'
        ' reason: ([$e.category, $e.message] | map(select(. != null)) | join(": "))}'
        " + (if ($ids | length) > 0 then ($ids[] | {key: .}) else {} end)",
        ".objectWriteTraceId // .id",
    ),
    # JSON:API: `errors[]` whose `source.pointer` is `/data/N` (or `/data/N/...`), `status` a string.
    "jsonapi": (
        "(.errors // [])[] | . as $e"
        ' | ($e.source.pointer // "" | capture("^/data/(?<n>[0-9]+)(/|$)").n // null) as $n'
        " | {status: ($e.status // 500 | tonumber? // 500),"
        ' reason: ([$e.code, $e.title, $e.detail] | map(select(. != null)) | join(": "))}'
        " + (if $n == null then {} else {index: ($n | tonumber)} end)",
        None,
    ),
    # Elasticsearch/OpenSearch `_bulk`: `items[]` in request order, each `{OP: {status, error}}`.
    "elasticsearch": (
        "if .errors == false then empty else (.items // [])"
        " | to_entries[] | .key as $i | (.value | to_entries[0].value) as $r"
        " | select(($r.status // 0) >= 300)"
        " | {index: $i, status: $r.status,"
        ' reason: ([$r.error.type, $r.error.reason] | map(select(. != null)) | join(": "))} end',
        None,
    ),
}


PRESET_MEMBERS: dict[str, tuple[str, ...]] = {
    "hubspot": ("errors",),
    "jsonapi": ("errors",),
    "elasticsearch": ("errors", "items"),
}
"""The top-level members of an answer each preset reads (`actors.sink.items` hands jq no more)."""


class ItemOutcomesConfig(Section, frozen=True):
    """Read which items of a batch the receiver refused from its 2xx answer (docs/reliability.md).

    Give `preset`, or `failed` (and `item_key` when `failed` names items by key). Refused items
    retry or dead-letter on their own, by their own status; the others are delivered. An answer
    that cannot be read (not JSON, the program fails, an item it names is not in the batch)
    makes the whole batch retryable.
    """

    preset: Annotated[
        Preset | None,
        Meta(
            description="A known answer shape: `hubspot` (`errors[]` naming inputs by "
            "`objectWriteTraceId` or `id`), `jsonapi` (`errors[]` with `source.pointer` `/data/N`), "
            "`elasticsearch` (bulk `items[].OP.status`)."
        ),
    ] = None
    failed: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(
            description="jq over the answer's JSON body (an empty body reads as null) giving one object "
            "per refused item: `{index: N}` (0-based position in the batch) or `{key: K}` (matched "
            "against `item_key`), with `status` (HTTP-like number; 2xx: not refused) and `reason`."
        ),
    ] = None
    item_key: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(
            description="jq over each item sent giving the key `failed` names it by (e.g. `.id`); "
            "overrides the preset's."
        ),
    ] = None

    def programs(self) -> tuple[str, str | None]:
        """(the `failed` program, the `item_key` program) in force."""
        if self.preset is not None:
            failed, key = PRESETS[self.preset]
            return failed, self.item_key or key
        assert self.failed is not None
        return self.failed, self.item_key


def check_item_outcomes(path: str, config: ItemOutcomesConfig) -> Iterator[str]:
    """Config errors of one `item_outcomes` table (TOML `path`): the choice, and jq that compiles."""
    if (config.preset is None) == (config.failed is None):
        yield f"{path}: give either `preset` or `failed` (a jq program), not both or neither"
        return
    failed, key = config.programs()
    for name, program in (("failed", failed), ("item_key", key)):
        if program is None:
            continue
        try:
            jq.compile(program)
        except ValueError as exc:
            yield f"{path}.{name}: invalid jq program: {' '.join(str(exc).split())}"
