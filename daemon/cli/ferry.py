"""`ferry` command line: `run`, `check`, `ctl`, `store copy`, `config-schema`, `config-docs`.

Exit codes: 0 success; 1 the daemon failed at run time (store unusable,
too many actor restarts); 2 a usage or config error; `ferry ctl` adds
3, the daemon is not running (see `daemon/cli/ctl.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import msgspec
import trio

from daemon.config.root import LoadedConfig, json_schema, load
from daemon.errors import ConfigError, FerryError, SchemaMismatch
from daemon.telemetry import masking
from daemon.telemetry.logs import setup_logging

log = logging.getLogger("ferry.cli")
DEFAULT_CONFIG = "config.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="A small, correct integration daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides [telemetry] log_level (default: info)",
    )
    check = commands.add_parser("check", help="validate a config file; exit 0 if valid, 2 if not")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    tests = commands.add_parser(
        "test", help="run a config's transform unit tests (no network); exit 0 if all pass, 1 if not"
    )
    tests.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    tests.add_argument("files", nargs="+", metavar="TESTS", help="test files (TOML, or .json)")
    commands.add_parser("config-schema", help="print the JSON Schema of the config file")
    from daemon.cli.ctl import configure

    configure(commands.add_parser("ctl", help="steer a running daemon over its control socket"))
    from daemon.cli.store import configure as configure_store

    configure_store(
        commands.add_parser("store", help="offline store operations: copy SQLite into PostgreSQL")
    )
    docs = commands.add_parser("config-docs", help="print the config reference (Markdown)")
    docs.add_argument("-o", "--output", help="write to this file instead of stdout")
    return parser


def _load_or_report(path: str) -> LoadedConfig | None:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration ({len(exc.problems)} error(s))", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _run(path: str, level: str | None) -> int:
    loaded = _load_or_report(path)
    if loaded is None:
        return 2
    config = loaded.config
    redactor = masking.config_redactor(config)  # serve builds the same one for its actors
    setup_logging(level or config.telemetry.log_level, redactor)
    if config.telemetry.log_outcomes == "dead":
        logging.getLogger("ferry.sink.outcome").setLevel(logging.ERROR)
    for warning in loaded.warnings:
        log.warning("config warning", extra={"fields": {"warning": warning}})
    from daemon.app import serve

    try:
        trio.run(serve, loaded)
    except BaseExceptionGroup as group:
        matched, rest = group.split(FerryError)
        if rest is not None or matched is None:
            raise
        leaves = _leaves(matched)
        for error in leaves:
            log.critical(
                "daemon failed", extra={"fields": {"error": str(error), "kind": type(error).__name__}}
            )
        return 2 if any(isinstance(error, SchemaMismatch) for error in leaves) else 1
    except FerryError as error:
        log.critical("daemon failed", extra={"fields": {"error": str(error), "kind": type(error).__name__}})
        return 2 if isinstance(error, SchemaMismatch) else 1
    except KeyboardInterrupt:
        return 130
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ferry` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config, args.log_level)
    if args.command == "check":
        loaded = _load_or_report(args.config)
        if loaded is None:
            return 2
        config = loaded.config
        for warning in loaded.warnings:
            print(f"{args.config}: warning: {warning}", file=sys.stderr)
        print(
            f"{args.config}: ok ({len(config.sources)} source(s), {len(config.transforms)} transform(s), "
            f"{len(config.sinks)} sink(s))"
        )
        return 0
    if args.command == "test":
        from daemon.cli.pipeline_tests import run

        return run(args.config, args.files, sys.stdout, sys.stderr)
    if args.command == "ctl":
        from daemon.cli import ctl

        try:
            return ctl.main(args)
        except BrokenPipeError:
            # `ferry ctl status | head`: the reader is gone, which is not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "store":
        from daemon.cli import store

        return store.main(args)
    if args.command == "config-schema":
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(json_schema())).decode() + "\n")
        return 0
    if args.command == "config-docs":
        from daemon.cli.config_docs import render

        text = render()
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
