"""A fresh PostgreSQL database per test, on the server the machine runs (issue 15).

`postgres_url` creates `ferry_t_<random>` on the server named by `FERRY_TEST_POSTGRES`
(default `postgresql://127.0.0.1:5432/postgres`, trust auth), yields its URL and drops it
afterwards (`WITH (FORCE)`, so a daemon killed with -9 cannot leave it behind).

Without a reachable server the PostgreSQL tests skip with one line saying why and how to run
them — except under CI (`CI=true`, set by `.ci/run`), where a missing server is a failure:
a suite CI skips proves nothing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest

ADMIN_URL = os.environ.get("FERRY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
HOW = f"start PostgreSQL ≥ 13 on {ADMIN_URL} (trust auth) or point FERRY_TEST_POSTGRES at a server"


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {ADMIN_URL} ({str(exc).strip().splitlines()[0]}): {HOW}"
    return None


def require_postgres() -> None:
    """Skip (or, under CI, fail) the calling test when no server is reachable."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def url_of(database: str) -> str:
    """The admin URL with its database name replaced by `database`."""
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to an empty database of its own, dropped after the test."""
    require_postgres()
    name = f"ferry_t_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url_of(name)
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
