"""The PostgreSQL fixture gives each test a database of its own."""

from __future__ import annotations

import psycopg

from tests.postgres import ADMIN_URL, postgres_url, url_of

__all__ = ["postgres_url"]


def test_each_test_gets_a_database_of_its_own(postgres_url: str) -> None:
    name = postgres_url.rpartition("/")[2]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        row = conn.execute("SELECT current_database()").fetchone()
    assert row == (name,)
    assert url_of(name) == postgres_url
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        listed = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert listed == (1,)
