"""One transform's programs as pure functions of payloads: validate, filter + map, route, key, reduce.

The transformer and aggregator actors run these on committed events; `ferry test` runs them on
the events of a test file, with no store and no network, so a test sees exactly what the
daemon would do.

Order:
    1. `schema` (if any): an event that breaks it fails with every violation listed.
    2. `filter`, then `map` (jq), as one program run over a whole batch of events.
    3. With `aggregate`: each output's group `key` (jq, one value per output). A closed
       window's events go through `reduce` as one array.
    4. `routes`: the first route whose `when` is true gives the output's sinks; none true:
       `default_route` (unset: no sink). Without routes an output goes to every sink reading
       the transform (`sinks` is None).

Fan-out:
    `map` may give at most `max_outputs` outputs per event: jq's outputs are read as it yields
    them and jq is stopped at the next one, so nothing beyond it is ever built, and the event
    fails (`map produced more than N outputs`). The batch program streams every output followed
    by an end-of-event marker (a string holding a random nonce no input can know) rather than
    wrapping each event's outputs in an array under jq's `limit`: measured, `[limit(n; f)]` costs
    ~8 µs more per event than `[f]`, the marker nothing (docs/performance.md). A batch stops
    after the event whose outputs bring it to `BATCH_OUTPUTS` or more: `map` and `items` then
    answer for a prefix of the payloads and the caller runs the rest in another call. So one
    call holds at most `BATCH_OUTPUTS + max_outputs` outputs in memory, whatever the events are.

Errors:
    A failure is per event (`Failure` with the message a dead letter will carry): a schema
    violation, a jq error in any program, an event that is not UTF-8, a key that is not one
    value. The other events of the batch are unaffected. Anything else one event makes these
    programs raise (`RecursionError` encoding 1,000 nested arrays, …) is that event's `Failure`
    too (`daemon.poison.reason`), so one event never fails the batch; `MemoryError` is not caught.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar, final

import jq
import msgspec

from actors.transform.config import TransformConfig
from actors.transform.validation import EventValidator, describe, load_schema
from daemon.poison import isolable, reason

_encode = msgspec.json.Encoder().encode

BATCH_OUTPUTS: Final = 10_000
"""A batch stops after the event whose outputs bring it to this many (see "Fan-out")."""


class Failure(NamedTuple):
    """Why one event could not be transformed (the dead letter's error text)."""

    message: str


class Routed(NamedTuple):
    """One output: its JSON and the sinks it goes to (None: every sink reading the transform)."""

    payload: bytes
    sinks: tuple[str, ...] | None


class Keyed(NamedTuple):
    """One output of an aggregating transform, before windowing: its JSON and its group as JSON."""

    payload: bytes
    key: str


def route_expression(routes: Sequence[Any]) -> str:
    """A jq expression giving the index of the first route whose `when` holds for `.`, else -1."""
    cases = [f"(({route.when}) | select(.) | {index})" for index, route in enumerate(routes)]
    return f"first({', '.join([*cases, '-1'])})"


@final
class TransformProgram:
    """The compiled programs of one transform; see the module docstring. Raises `ValueError` on bad jq."""

    def __init__(self, config: TransformConfig) -> None:
        body = config.map if config.filter is None else f"select({config.filter}) | ({config.map})"
        self.max_outputs = config.max_outputs
        self._end = f"\u0000ferry-end-{secrets.token_hex(16)}"
        each = f"limit({config.max_outputs + 1}; {body})"  # one event alone: jq stops past the bound
        self._routes = [tuple(route.to) for route in config.routes]
        self._default = tuple(config.default_route or ())
        routed = f"[., {route_expression(config.routes)}]" if config.routes else None
        self.aggregate = config.aggregate
        if self.aggregate is not None:
            output = f"[., ({self.aggregate.key})]"
            reduce = self.aggregate.reduce
            reduced = f"({reduce}) | {routed}" if routed else reduce
            self._reduce = jq.compile(f"[limit(2; {reduced})]")  # one output allowed: stop at the second
        else:
            output = routed or "."
        self._main = jq.compile(f"(({body}) | {output}), {msgspec.json.encode(self._end).decode()}")
        self._each = jq.compile(f"[({each}) | {output}]")
        schema = config.schema
        self._validator = EventValidator(load_schema(schema)) if schema is not None else None

    def map(self, payloads: Sequence[bytes]) -> list[list[Routed] | Failure]:
        """The routed outputs of each event of a prefix of `payloads` (a transform without
        `aggregate`); the prefix is shorter than `payloads` only past `BATCH_OUTPUTS`."""
        return [
            result if isinstance(result, Failure) else _guarded(self._routed, result)
            for result in self._bounded(self._run(payloads))
        ]

    def items(self, payloads: Sequence[bytes]) -> list[list[Keyed] | Failure]:
        """Each event's outputs with their group keys (a transform with `aggregate`), for a
        prefix of `payloads` as in `map`."""
        return [
            result if isinstance(result, Failure) else _guarded(_keyed, result)
            for result in self._bounded(self._run(payloads))
        ]

    def _bounded(self, results: list[list[Any] | Failure]) -> list[list[Any] | Failure]:
        limit = self.max_outputs
        return [
            _too_many(limit) if not isinstance(result, Failure) and len(result) > limit else result
            for result in results
        ]

    def reduce(self, items: Sequence[bytes]) -> list[Routed] | Failure:
        """The output of one closed window, given its events' JSON in arrival order."""
        (result,) = self._run([b"[" + b",".join(items) + b"]"], reduce=True)
        if isinstance(result, Failure):
            return result
        if len(result) > 1:
            return Failure("aggregate reduce: gave more than one output for one window; it must give one")
        if self._routes:
            return _guarded(self._routed, result)  # type: ignore[no-any-return]
        return _guarded(lambda values: [Routed(_encode(value), None) for value in values], result)  # type: ignore[no-any-return]

    def _routed(self, values: list[Any]) -> list[Routed]:
        if not self._routes:
            return [Routed(_encode(value), None) for value in values]
        return [
            Routed(_encode(value), self._routes[index] if index >= 0 else self._default)
            for value, index in values
        ]

    def _run(self, payloads: Sequence[bytes], *, reduce: bool = False) -> list[list[Any] | Failure]:
        """The main program's outputs for each payload (`reduce`'s for one window's array),
        validating first; jq runs once for the whole batch."""
        validate = not reduce
        results: list[list[Any] | Failure | None] = [None] * len(payloads)
        texts: list[str] = []
        todo: list[int] = []
        for index, payload in enumerate(payloads):
            try:
                text = payload.decode()
            except UnicodeDecodeError as exc:
                results[index] = Failure(f"event is not UTF-8: {exc}")
                continue
            if validate and self._validator is not None:
                try:
                    violations = self._validator.violations(msgspec.json.decode(payload))
                except Exception as exc:
                    if not isolable(exc):
                        raise
                    results[index] = Failure(reason("schema", exc))
                    continue
                if violations:
                    results[index] = Failure(describe(violations))
                    continue
            texts.append(text)
            todo.append(index)
        if todo:
            if reduce:
                outcomes = _apply_each(self._reduce, texts)
            else:
                outcomes = _apply(self._main, self._each, self._end, self.max_outputs, texts)
            for index, outcome in zip(todo, outcomes, strict=False):
                results[index] = outcome
            if len(outcomes) < len(todo):  # stopped at BATCH_OUTPUTS: answer for the prefix only
                results = results[: todo[len(outcomes)]]
        return [result if result is not None else Failure("not transformed") for result in results]


T = TypeVar("T")


def every(step: Callable[[Sequence[bytes]], list[T]], payloads: Sequence[bytes]) -> list[T]:
    """`step` (a program's `map` or `items`) over all of `payloads`, one prefix after another;
    for callers that hold every result anyway (`ferry test`). Each call covers at least one."""
    results: list[T] = []
    while len(results) < len(payloads):
        results.extend(step(payloads[len(results) :]))
    return results


def _guarded(fn: Callable[[list[Any]], list[Routed] | list[Keyed] | Failure], values: list[Any]) -> Any:
    """`fn(values)`, or the event's `Failure` when it raises (encoding a too deep output, …)."""
    try:
        return fn(values)
    except Exception as exc:
        if not isolable(exc):
            raise
        return Failure(reason("transform output", exc))


def _keyed(pairs: list[list[Any]]) -> list[Keyed] | Failure:
    for pair in pairs:
        if len(pair) != 2:
            return Failure(f"aggregate key: gave {len(pair) - 1} values for one output; it must give one")
    return [Keyed(_encode(value), _encode(key).decode()) for value, key in pairs]


def _apply(main: Any, each: Any, end: str, max_outputs: int, texts: list[str]) -> list[list[Any] | Failure]:
    """One jq run of `main` over every text (a third cheaper per event than one run each), read
    as jq yields: each event's outputs end at the `end` marker. An event past `max_outputs`
    fails there and jq starts again after it. On a jq error, `each` runs every text alone.

    Stops after the text whose outputs bring the total to `BATCH_OUTPUTS`: the answer then
    covers a prefix of `texts`. (Each text is one JSON value, stored or encoded by ferry, so
    the n-th end marker closes the n-th text's outputs.)
    """
    batch: list[list[Any] | Failure] = []
    total = 0
    try:
        while len(batch) < len(texts):
            outputs: list[Any] = []
            for value in main.input_text("\n".join(texts[len(batch) :])):
                if value.__class__ is str and value == end:
                    batch.append(outputs)
                    total += len(outputs)
                    if total >= BATCH_OUTPUTS and len(batch) < len(texts):
                        return batch
                    outputs = []
                elif len(outputs) < max_outputs:
                    outputs.append(value)
                else:  # jq is left unread here: nothing past the bound is built
                    batch.append(_too_many(max_outputs))
                    break
            else:
                break
        if len(batch) == len(texts):
            return batch
    except Exception as exc:
        if not isolable(exc):
            raise
    return _apply_each(each, texts)


def _too_many(max_outputs: int) -> Failure:
    return Failure(f"map produced more than {max_outputs} outputs for one event (max_outputs)")


def _apply_each(program: Any, texts: list[str]) -> list[list[Any] | Failure]:
    """`program` (outputs wrapped in one array) over each text alone: a jq error fails one event."""
    results: list[list[Any] | Failure] = []
    total = 0
    for text in texts:
        try:
            (outputs,) = program.input_text(text).all()
            results.append(outputs)
            total += len(outputs)
        except ValueError as exc:
            results.append(Failure("jq: " + " ".join(str(exc).split())))
        except Exception as exc:
            if not isolable(exc):
                raise
            results.append(Failure(reason("jq", exc)))
        if total >= BATCH_OUTPUTS:
            break
    return results
