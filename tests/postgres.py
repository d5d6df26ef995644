"""A fresh PostgreSQL database per test, on the server the machine runs (issue 15).

`postgres_url` creates `ferry_t_<random>` on the server named by `FERRY_TEST_POSTGRES`
(default `postgresql://127.0.0.1:5432/postgres`, trust auth), yields its URL and drops it
afterwards (`WITH (FORCE)`, so a daemon killed with -9 cannot leave it behind).

Without a reachable server the PostgreSQL tests skip with one line saying why and how to run
them — except under CI (`CI=true`, set by `.ci/run`), where a missing server is a failure:
a suite CI skips proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import trio

from daemon.store.postgres.connect import open_database
from daemon.store.postgres.store import PostgresStore

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


@pytest.fixture
def ferry_database(postgres_url: str) -> str:
    """`postgres_url` migrated to this code's schema, as the first node's store leaves it: what the
    cluster's coordination and shared budgets (tables of the outbox's migrations) run on."""
    open_database(postgres_url, node="test", cipher=None).close()
    return postgres_url


class TcpProxy:
    """A TCP relay on 127.0.0.1 to the test server that a test can cut and restore, so the database
    becomes unreachable (connections reset, new ones refused) without stopping the machine's
    server, which others use. Threads, not trio: the store under test talks through it from its own
    thread while the test's trio loop waits.
    """

    def __init__(self, target: str = ADMIN_URL) -> None:
        info = psycopg.conninfo.conninfo_to_dict(target)
        self._target = (str(info.get("host", "127.0.0.1")), int(str(info.get("port", 5432))))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def url(self, database_url: str) -> str:
        """`database_url` through the proxy."""
        name = database_url.rpartition("/")[2]
        return f"postgresql://127.0.0.1:{self.port}/{name}"

    def restore(self) -> None:
        """Listen (again, on the same port) and relay new connections."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every relayed one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target, timeout=5)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown, not just close: a close does not reach a socket another thread is reading,
            # so the server would never see the client go (as it does when a real process dies).
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A `TcpProxy` to the test server, cut at the end."""
    require_postgres()
    proxy = TcpProxy()
    try:
        yield proxy
    finally:
        proxy.cut()


@contextlib.asynccontextmanager
async def two_nodes(url: str, *, lease: float) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two running stores on database `url`, as nodes `node-a` and `node-b` whose delivery claims
    last `lease` seconds; stopped and closed afterwards."""
    a = PostgresStore.open(url, node="node-a", lease=lease)
    b = PostgresStore.open(url, node="node-b", lease=lease)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            yield a, b
            nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()
