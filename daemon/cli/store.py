"""`ferry store copy SQLITE_FILE DATABASE_URL`: move a stopped daemon's SQLite outbox into PostgreSQL.

For a user who outgrows one box (cluster mode, docs/cluster.md): stop the daemon, copy, point
every node's `[store]` at the database (`backend = "postgres"`, `url = …`), start them. What is
copied and what is guaranteed: `daemon.store.copy`.

`DATABASE_URL` may be a secret reference (`env:FERRY_DATABASE_URL`, `file:…`, `credential:…`),
as in the config, so the password need not be on the command line.

Exit codes: 0 copied (the counts are printed); 2 refused before anything was written (the SQLite
store is in use or not ferry's, the database is not empty or not reachable, a bad reference);
1 the copy failed and was rolled back (the database is as it was).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from daemon.config.secrets import resolve
from daemon.errors import ConfigError, StoreCorrupt, StoreError, StoreUnavailable


def configure(parser: argparse.ArgumentParser) -> None:
    """The `store` subcommands."""
    commands = parser.add_subparsers(dest="store_command", required=True)
    copy = commands.add_parser(
        "copy",
        help="copy a stopped daemon's SQLite store into an empty PostgreSQL database",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    copy.add_argument("source", metavar="SQLITE_FILE", help="the SQLite store ([store] path)")
    copy.add_argument(
        "url", metavar="DATABASE_URL", help="postgresql://… or a secret reference (env:NAME, file:PATH, …)"
    )


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from daemon.store.copy import CopyRefused, copy_store

    try:
        url = resolve(args.url).reveal()
    except ConfigError as exc:
        print(f"ferry store copy: {exc}", file=err)
        return 2
    source = Path(args.source)
    try:
        copied = copy_store(source, url)
    except (CopyRefused, StoreUnavailable, StoreCorrupt) as exc:
        print(f"ferry store copy: refused: {exc}", file=err)
        return 2
    except StoreError as exc:
        print(f"ferry store copy: failed: {exc}", file=err)
        return 1
    print(f"copied {source} into {copied.target}: {copied.total} rows, counts verified", file=out)
    for table, rows in copied.rows.items():
        if rows:
            print(f"  {table:<14} {rows}", file=out)
    return 0
