"""`ferry test -c CONFIG TESTS…`: unit tests of a config's transforms, with no store and no network.

A test file (TOML, or JSON when it ends in `.json`) lists cases; each feeds input events to one
transform and states every output it must produce, in order, and which inputs it must
dead-letter:

    [[tests]]
    name = "a lead goes to the CRM only"
    transform = "contact"
    inputs = [{ type = "lead", email = "ada@example.com" }]
    outputs = [{ event = { kind = "lead", email = "ada@example.com" }, to = ["crm"] }]
    dead = [{ input = 1, error = "schema" }]        # input #1 (from 0), error text contains "schema"

The transform runs through the same programs as in the daemon (`actors.transform.program`): schema,
filter, map, routes. `to` (optional) is the set of sinks an output goes to: those of its route,
or every sink reading the transform when it has no routes. An aggregating transform's windows
close by count as the inputs fill them; at the end of the inputs every window still open closes
(as if its `max_age` had passed), oldest first. A transform with `enrich` needs the network and
is refused.

Exit codes: 0 every case passed; 1 a case failed (each failure shows a diff of expected and
actual); 2 the config or a test file is invalid (each problem named by its path).
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import msgspec
from msgspec import Meta

from actors.transform.config import TransformConfig
from actors.transform.program import Failure, Routed, TransformProgram, every
from daemon.config.root import Config, downstream
from daemon.errors import ConfigError
from daemon.store.windows import Windows


class ExpectedOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One output the transform must produce."""

    event: Any
    to: list[str] | None = None


class ExpectedDead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An input the transform must dead-letter (index from 0), and a text its error contains."""

    input: Annotated[int, Meta(ge=0)]
    error: str = ""


class Case(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1)]
    transform: str
    inputs: Annotated[list[Any], Meta(min_length=1)]
    outputs: list[ExpectedOutput] = []
    dead: list[ExpectedDead] = []


class TestFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tests: Annotated[list[Case], Meta(min_length=1)]


class TestFileError(Exception):
    """A test file that cannot be used; `problems` name each mistake by its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_encode = msgspec.json.Encoder().encode


def load_tests(path: Path, config: Config) -> TestFile:
    """Read and check a test file against `config`; raise `TestFileError` listing every problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TestFileError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        raw = msgspec.json.decode(data) if path.suffix == ".json" else tomllib.loads(data.decode())
    except (msgspec.DecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise TestFileError([f"$: invalid {kind}: {exc}"]) from None
    try:
        tests = msgspec.convert(raw, TestFile)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = message.rsplit(" - at `", 1)
        raise TestFileError(
            [f"{where[1].rstrip('`')}: {where[0]}" if len(where) == 2 else f"$: {message}"]
        ) from None
    problems = list(_case_problems(tests, config))
    if problems:
        raise TestFileError(problems)
    return tests


def _case_problems(tests: TestFile, config: Config) -> Iterator[str]:
    wiring = downstream(config)
    for index, case in enumerate(tests.tests):
        where = f"$.tests[{index}]"
        transform = config.transforms.get(case.transform)
        if transform is None:
            known = ", ".join(sorted(config.transforms)) or "none"
            yield f"{where}.transform: no transform {case.transform!r} in the config (transforms: {known})"
            continue
        if getattr(transform, "enrich", None) is not None:
            yield f"{where}.transform: {case.transform!r} enriches over HTTP, which ferry test does not do"
        sinks = set(wiring[case.transform][1])
        for position, output in enumerate(case.outputs):
            for n, sink in enumerate(output.to or ()):
                if sink not in sinks:
                    yield (
                        f"{where}.outputs[{position}].to[{n}]: {sink!r} is not a sink reading "
                        f"{case.transform!r}"
                    )
        for position, dead in enumerate(case.dead):
            if dead.input >= len(case.inputs):
                yield f"{where}.dead[{position}].input: {dead.input}, but there are {len(case.inputs)} inputs"


@dataclass
class Outcome:
    """What a transform did with a case's inputs."""

    outputs: list[dict[str, Any]]  # {"event": …, "to": [sinks]}
    dead: list[tuple[int, str]]  # (input index, error)


def run_transform(transform: TransformConfig, sinks: Sequence[str], inputs: Sequence[Any]) -> Outcome:
    """Feed `inputs` to one transform as the daemon would, without a store (see the module docstring)."""
    program = TransformProgram(transform)
    payloads = [_encode(value) for value in inputs]
    outcome = Outcome([], [])

    def add(routed: Routed) -> None:
        to = list(sinks) if routed.sinks is None else list(routed.sinks)
        outcome.outputs.append({"event": msgspec.json.decode(routed.payload), "to": sorted(to)})

    aggregate = transform.aggregate
    if aggregate is None:
        for index, result in enumerate(every(program.map, payloads)):
            if isinstance(result, Failure):
                outcome.dead.append((index, result.message))
            else:
                for routed in result:
                    add(routed)
        return outcome
    windows = Windows(aggregate.max_events, aggregate.max_age)
    contents: dict[int, list[bytes]] = {}

    def emit() -> None:
        for window in windows.take_closed():
            result = program.reduce(contents.pop(window.id))
            if isinstance(result, Failure):
                outcome.dead.append((-1, f"window {window.key}: {result.message}"))
            else:
                for routed in result:
                    add(routed)

    for index, keyed in enumerate(every(program.items, payloads)):
        if isinstance(keyed, Failure):
            outcome.dead.append((index, keyed.message))
            continue
        for payload, key in keyed:
            window, _ = windows.join(key, clock=0.0, wall=0.0)
            contents.setdefault(window.id, []).append(payload)
        emit()
    windows.close_all()
    emit()
    return outcome


def check_case(case: Case, outcome: Outcome) -> list[str]:
    """The failures of one case: a diff of the outputs, and dead letters expected or not."""
    failures: list[str] = []
    checks_routes = [output.to is not None for output in case.outputs]
    expected = [
        {"event": output.event, "to": sorted(output.to)} if output.to is not None else {"event": output.event}
        for output in case.outputs
    ]
    actual = [
        output if index < len(checks_routes) and checks_routes[index] else {"event": output["event"]}
        for index, output in enumerate(outcome.outputs)
    ]
    if _normal(expected) != _normal(actual):
        failures.append("outputs differ (- expected, + actual):\n" + _diff(expected, actual))
    found = dict(outcome.dead)
    for dead in case.dead:
        error = found.pop(dead.input, None)
        if error is None:
            failures.append(f"input {dead.input} was not dead-lettered")
        elif dead.error not in error:
            failures.append(f"input {dead.input} was dead-lettered, but with {error!r}, not {dead.error!r}")
    for index, error in sorted(found.items()):
        what = f"input {index}" if index >= 0 else "a window"
        failures.append(f"{what} was dead-lettered unexpectedly: {error}")
    return failures


def _normal(value: Any) -> Any:
    return msgspec.json.decode(_encode(value))


def _diff(expected: list[Any], actual: list[Any]) -> str:
    def lines(value: list[Any]) -> list[str]:
        return msgspec.json.format(_encode(value), indent=2).decode().splitlines()

    diff = difflib.unified_diff(lines(expected), lines(actual), "expected", "actual", lineterm="", n=2)
    return "\n".join(diff)


def run(config_path: str, test_paths: Sequence[str], out: TextIO, err: TextIO) -> int:
    """`ferry test`: run every case of every file; see the module docstring for exit codes."""
    from daemon.config.root import load

    try:
        config = load(config_path, read_secrets=False).config
    except ConfigError as exc:
        print(f"{config_path}: invalid configuration ({len(exc.problems)} error(s))", file=err)
        for problem in exc.problems:
            print(f"  {problem}", file=err)
        return 2
    files: list[tuple[str, TestFile]] = []
    for name in test_paths:
        try:
            files.append((name, load_tests(Path(name), config)))
        except TestFileError as exc:
            print(f"{name}: invalid test file ({len(exc.problems)} error(s))", file=err)
            for problem in exc.problems:
                print(f"  {problem}", file=err)
    if len(files) != len(test_paths):
        return 2
    wiring = downstream(config)
    passed = failed = 0
    for name, tests in files:
        out.write(f"{name}\n")
        for case in tests.tests:
            outcome = run_transform(config.transforms[case.transform], wiring[case.transform][1], case.inputs)
            failures = check_case(case, outcome)
            if failures:
                failed += 1
                out.write(f"  FAIL  {case.name} ({case.transform})\n")
                for failure in failures:
                    out.write("".join(f"        {line}\n" for line in failure.splitlines()))
            else:
                passed += 1
                out.write(f"  ok    {case.name}\n")
    out.write(f"{passed} passed, {failed} failed\n")
    return 1 if failed else 0
