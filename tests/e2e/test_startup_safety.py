"""Startup with a database file ferry must not use: the real daemon refuses it, names it, leaves it be.

Each case starts `ferry run` as a real process and expects exit code 1 with one `daemon failed`
log line that names the file (or folder) and says what is wrong, while every byte already on disk
stays as it was. File modes mean nothing to root, so the permission cases run the daemon as
`nobody` when the suite runs as root (as CI does).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.store import outbox
from daemon.store.schema import MIGRATIONS
from daemon.store.sqlite import open_connection
from tests.fakes import ROOT

NOBODY = 65534
AS_ROOT = os.geteuid() == 0

CONFIG = """
[store]
path = "state/ferry.db"

[listener]
address = "127.0.0.1:0"

[control]
socket = "{folder}/ferry.sock"

[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "{folder}/out.jsonl"
"""


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ferry-startup-", dir="/tmp"))
    path.chmod(0o755)
    (path / "state").mkdir()
    (path / "ferry.toml").write_text(CONFIG.format(folder=path), encoding="utf-8")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ferry_db(path: Path, events: int = 2000) -> None:
    """A real ferry database holding `events` pending events, checkpointed into the main file."""
    conn = open_connection(path, "normal")
    conn.execute("BEGIN")
    for n in range(events):
        outbox.insert_event(conn, "demo", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200), None, ["out"])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under the state folder with its SHA-256.

    SQLite's side files hold no data of their own when empty, and opening a WAL database to read
    its header may create them: the -shm index and an empty -wal are left out.
    """
    return {
        str(file.relative_to(folder)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted((folder / "state").rglob("*"))
        if file.is_file()
        and not file.name.endswith("-shm")
        and not (file.name.endswith("-wal") and file.stat().st_size == 0)
    }


def start_refused(folder: Path, *, as_nobody: bool = False) -> dict[str, object]:
    """Run `ferry run`, expect exit 1, return its `daemon failed` log line."""
    launcher = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    done = subprocess.run(
        [*launcher, sys.executable, "-m", "daemon.cli", "run", "-c", str(folder / "ferry.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines: list[dict[str, object]] = [
        json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")
    ]
    failed = [line for line in lines if line.get("msg") == "daemon failed"]
    assert len(failed) == 1, lines
    assert not any(line.get("msg") == "ready" for line in lines)
    return failed[0]


def garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def text(db: Path) -> None:
    db.write_text("id,name\n1,Ada\n" * 500, encoding="utf-8")


def foreign(db: Path) -> None:
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        other.execute("INSERT INTO invoices VALUES (1, 9.5)")
    other.close()


def foreign_app(db: Path) -> None:
    with sqlite3.connect(db) as other:
        other.execute("PRAGMA application_id = 1234")
    other.close()


def truncated(db: Path) -> None:
    ferry_db(db)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def damaged_pages(db: Path) -> None:
    ferry_db(db)
    data = bytearray(db.read_bytes())
    page = 4096
    for offset in range(page * 4, len(data), page * 9):  # scribble over every ninth page's start
        data[offset : offset + 64] = b"\xa5" * 64
    db.write_bytes(bytes(data))


def newer_schema(db: Path) -> None:
    ferry_db(db, events=10)
    with sqlite3.connect(db) as newer:
        newer.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    newer.close()


@pytest.mark.parametrize(
    ("spoil", "kind", "says"),
    [
        (garbage, "StoreCorrupt", "not a usable SQLite database"),
        (text, "StoreCorrupt", "not a usable SQLite database"),
        (foreign, "StoreCorrupt", "not a ferry database"),
        (foreign_app, "StoreCorrupt", "not a ferry database (application_id=1234)"),
        (truncated, "StoreCorrupt", "malformed"),
        (damaged_pages, "StoreCorrupt", "damaged"),
        (newer_schema, "StoreCorrupt", "newer than this ferry"),
    ],
    ids=[
        "random-bytes",
        "csv-text",
        "foreign-sqlite",
        "foreign-application-id",
        "truncated",
        "damaged",
        "newer",
    ],
)
def test_an_unusable_database_file_is_refused_by_name_and_left_untouched(
    folder: Path, spoil: Callable[[Path], None], kind: str, says: str
) -> None:
    db = folder / "state" / "ferry.db"
    spoil(db)
    before = snapshot(folder)

    failed = start_refused(folder)

    assert failed["kind"] == kind
    assert str(failed["error"]).startswith(f"{db}: ")
    assert says in str(failed["error"])
    assert "left untouched" in str(failed["error"])
    assert snapshot(folder) == before


def test_a_folder_where_the_database_should_be_is_refused(folder: Path) -> None:
    (folder / "state" / "ferry.db").mkdir()
    failed = start_refused(folder)
    assert failed["error"] == f"{folder}/state/ferry.db: not a regular file"


# -- permissions --------------------------------------------------------------------------------


@functools.cache
def nobody_can_run_ferry() -> bool:
    """Whether `nobody` can import ferry from this checkout (not when it lies under a private folder)."""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import daemon.cli",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def own(folder: Path) -> bool:
    """Give the folder to the user the daemon will run as; True when that user is `nobody`."""
    if AS_ROOT and not nobody_can_run_ferry():
        pytest.skip("file modes do not bind root, and user nobody cannot read this checkout to run ferry")
    if AS_ROOT:
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
    return AS_ROOT


def test_a_read_only_database_file_is_refused_at_startup_not_at_the_first_webhook(folder: Path) -> None:
    db = folder / "state" / "ferry.db"
    ferry_db(db, events=20)
    as_nobody = own(folder)
    db.chmod(0o444)
    before = snapshot(folder)

    failed = start_refused(folder, as_nobody=as_nobody)

    assert failed["kind"] == "StoreUnavailable"
    assert str(failed["error"]).startswith(f"{db}: cannot write to the database (attempt to write a readonly")
    assert "the daemon's user must be able to read and write" in str(failed["error"])
    assert snapshot(folder) == before


def test_a_read_only_state_folder_is_refused(folder: Path) -> None:
    db = folder / "state" / "ferry.db"
    ferry_db(db, events=20)
    as_nobody = own(folder)
    (folder / "state").chmod(0o555)
    before = snapshot(folder)

    failed = start_refused(folder, as_nobody=as_nobody)

    assert str(failed["error"]).startswith(f"{db}: cannot write to the database")
    assert snapshot(folder) == before


def test_an_unreadable_database_file_is_refused(folder: Path) -> None:
    db = folder / "state" / "ferry.db"
    ferry_db(db, events=20)
    as_nobody = own(folder)
    db.chmod(0o000)
    content = db.read_bytes()  # the test itself still may (root, or the owner's own process)

    failed = start_refused(folder, as_nobody=as_nobody)

    assert str(failed["error"]).startswith(f"{db}: cannot open database (unable to open database file)")
    assert db.read_bytes() == content


def test_a_missing_state_folder_is_created(folder: Path) -> None:
    shutil.rmtree(folder / "state")
    config = folder / "ferry.toml"
    config.write_text(config.read_text().replace("state/ferry.db", "new/deeper/ferry.db"), encoding="utf-8")
    done = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "-c", str(config)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert done.stderr is not None
        for line in done.stderr:
            if '"msg":"ready"' in line:
                break
        else:
            pytest.fail("the daemon stopped before it was ready")
        assert (folder / "new" / "deeper" / "ferry.db").is_file()
    finally:
        done.terminate()
        done.wait(15)


def test_a_missing_state_folder_that_cannot_be_created_is_refused_by_name(folder: Path) -> None:
    shutil.rmtree(folder / "state")
    as_nobody = own(folder)
    folder.chmod(0o555)

    failed = start_refused(folder, as_nobody=as_nobody)

    assert failed["error"] == f"{folder}/state: cannot create state directory: Permission denied"
    assert not (folder / "state").exists()
