"""The tables a transform may add to its jq `map`: `schema`, `routes` and `aggregate`.

Order inside one transform: the input event is validated against `schema` (an invalid
event is dead-lettered with every violation), then `filter` and `map` run; with
`aggregate` the outputs collect in windows and each closed window's `reduce` result is
the output; `routes` finally decide which of the transform's sinks get each output.

`check_transform` is the part of `ferry check` that needs more than types: schema files
that exist and are valid JSON Schema, jq programs that compile, route targets that are
sinks reading this transform.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any

import jq
from msgspec import Meta

from actors.transform.validation import SchemaProblem, load_schema
from daemon.config.base import ComponentName, Section
from daemon.config.sync import EnrichConfig
from daemon.config.units import Duration

SchemaSpec = str | dict[str, Any]
SCHEMA = Meta(
    description="The shape each input event must have, as JSON Schema (draft 2020-12 unless "
    "`$schema` says otherwise): a file path (relative to the config's folder) or an inline table. "
    "An event that does not match is dead-lettered with every violation (path and message); "
    "`format` is checked (email, date-time, uuid, ipv4, …)."
)


class RouteConfig(Section, frozen=True):
    """One route: outputs for which `when` is true go to the sinks in `to` (the first match wins)."""

    when: Annotated[
        str, Meta(min_length=1, description="jq predicate on the transform's output (true: this route).")
    ]
    to: Annotated[
        list[ComponentName],
        Meta(
            min_length=1,
            description="Sinks that get the output; each must list this transform in `inputs`.",
        ),
    ]


class AggregateConfig(Section, frozen=True):
    """Tumbling windows per group: outputs collect per `key`; a closed window emits `reduce` of its events.

    A window opens with its group's first event and closes when it holds `max_events` or
    when `max_age` has passed since it opened, whichever comes first. Window contents live
    in the store: a restart (even `kill -9`) loses none and emits none twice.
    """

    key: Annotated[
        str, Meta(min_length=1, description="jq expression giving the group of an output (e.g. `.category`).")
    ]
    reduce: Annotated[
        str,
        Meta(
            description="jq program given the window's events as an array (in arrival order); its one "
            "output is the event emitted for the window (none: the window is dropped)."
        ),
    ] = "."
    max_events: Annotated[
        Annotated[int, Meta(ge=1, le=100_000)] | None,
        Meta(
            description="A window closes once it holds this many events (1 to 100,000; a closing "
            "window's events are read into memory for `reduce`)."
        ),
    ] = None
    max_age: Annotated[
        Duration | None, Meta(description="A window closes this long after its first event arrived.")
    ] = None


def check_transform(name: str, transform: Any, sinks: Mapping[str, Sequence[str]]) -> Iterator[str]:
    """Errors in one transform's `schema`, `routes`, `default_route` and `aggregate`.

    `sinks` maps every sink to its `inputs`. `transform` is a `TransformConfig` with its
    schema path already resolved.
    """
    where = f"$.transforms.{name}"
    if transform.schema is not None:
        try:
            load_schema(transform.schema)
        except SchemaProblem as exc:
            yield f"{where}.schema: {exc}"
    routed: set[str] = set()
    for index, route in enumerate(transform.routes):
        yield from _jq_error(f"{where}.routes[{index}].when", route.when)
        for position, target in enumerate(route.to):
            yield from _target_error(f"{where}.routes[{index}].to[{position}]", name, target, sinks)
            routed.add(target)
    if transform.default_route is not None:
        if not transform.routes:
            yield f"{where}.default_route: set without `routes`"
        for position, target in enumerate(transform.default_route):
            yield from _target_error(f"{where}.default_route[{position}]", name, target, sinks)
            routed.add(target)
    if transform.routes:
        for sink, inputs in sinks.items():
            if name in inputs and sink not in routed:
                yield (
                    f"{where}.routes: sink {sink!r} reads {name!r} but no route (nor default_route) "
                    "sends to it"
                )
    aggregate = transform.aggregate
    if aggregate is not None:
        yield from _jq_error(f"{where}.aggregate.key", aggregate.key)
        yield from _jq_error(f"{where}.aggregate.reduce", aggregate.reduce)
        if getattr(transform, "enrich", None) is not None:
            yield f"{where}.aggregate: cannot be combined with `enrich` (enrich in a transform before it)"
        if aggregate.max_events is None and aggregate.max_age is None:
            yield f"{where}.aggregate: set max_events, max_age or both (when does a window close?)"
        elif aggregate.max_age is not None and aggregate.max_age <= 0:
            yield f"{where}.aggregate.max_age: must be longer than 0s"


def _jq_error(where: str, program: str) -> Iterator[str]:
    try:
        jq.compile(program)
    except ValueError as exc:
        yield f"{where}: invalid jq program: {exc}"


def _target_error(where: str, name: str, target: str, sinks: Mapping[str, Sequence[str]]) -> Iterator[str]:
    if target not in sinks:
        yield f"{where}: unknown sink {target!r} (routes send to sinks)"
    elif name not in sinks[target]:
        yield f"{where}: sink {target!r} does not read {name!r} (add {name!r} to its inputs)"


class TransformConfig(Section, frozen=True):
    """A jq program applied to every event from `inputs`; each output is one event downstream."""

    inputs: Annotated[list[ComponentName], Meta(min_length=1, description="Sources or transforms to read.")]
    map: Annotated[str, Meta(description="jq program; may emit zero, one or many outputs per event.")] = "."
    max_outputs: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="Most outputs `map` may give for one event; jq is stopped at the next one and the "
            "event is dead-lettered (`map produced more than N outputs`), so one sender cannot make a "
            "transform hold an unbounded fan-out in memory (docs/limits.md#fan-out).",
        ),
    ] = 10_000
    filter: Annotated[
        str | None,
        Meta(description="jq predicate; events for which it is false or null are dropped (counted)."),
    ] = None
    schema: Annotated[SchemaSpec | None, SCHEMA] = None
    routes: Annotated[
        list[RouteConfig],
        Meta(
            description="Send each output only to some of the sinks reading this transform, by jq "
            'predicate: `[{ when = \'.type == "lead"\', to = ["crm"] }, …]`; the first route whose '
            "`when` is true wins (docs/transforms.md). Empty: every reader gets every output."
        ),
    ] = []
    default_route: Annotated[
        list[ComponentName] | None,
        Meta(description="Sinks for outputs no route matches; unset: those outputs go nowhere (counted)."),
    ] = None
    aggregate: Annotated[
        AggregateConfig | None,
        Meta(description="Group outputs into tumbling windows and emit one event per window."),
    ] = None
    enrich: Annotated[
        EnrichConfig | None,
        Meta(
            description="An HTTP lookup per event, merged in by jq before `schema`, `filter` and `map` "
            "(docs/enrichment-and-ordering.md)."
        ),
    ] = None
