"""Several real ferry nodes on one PostgreSQL database, for the cluster tests (docs/cluster.md).

Each node is `ferry run` as a process (`tests.fakes.Daemon`) with its own config file: the same
pipeline, its own listener port and control socket, `[store] backend = "postgres"` with the
URL in `FERRY_DATABASE_URL`, and short cluster timings so that failovers take a second or two.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.fakes import Daemon, ctl_json, free_port

HEARTBEAT = 0.5
LEASE_TTL = 3.0
FAILOVER = LEASE_TTL + HEARTBEAT
"""The bound docs/cluster.md states: a dead node's singleton resumes elsewhere within this (plus
its start)."""

NODE = """
[store]
backend = "postgres"
url = "env:FERRY_DATABASE_URL"
retention = "1h"

[cluster]
heartbeat = "{heartbeat}s"
lease_ttl = "{lease_ttl}s"
database_timeout = "2s"
delivery_lease = "{delivery_lease}"

[listener]
address = "127.0.0.1:{port}"

[control]
socket = "{socket}"

[supervisor]
shutdown_grace = "2s"

[telemetry]
metrics = false
traces = false
"""


@dataclass
class Node:
    """One node: its name, config, fixed port (kept across restarts) and its process."""

    name: str
    config: Path
    port: int
    daemon: Daemon

    @property
    def alive(self) -> bool:
        proc = self.daemon.proc
        return proc is not None and proc.poll() is None

    def start(self) -> Node:
        self.daemon.start(timeout=30)
        return self

    def kill9(self) -> None:
        self.daemon.kill9()

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = ctl_json(self.config, "status")
        return answer


@dataclass
class Cluster:
    """N nodes sharing `url`; `pipeline` is the TOML every node runs (`{node}` is its name)."""

    directory: Path
    url: str
    sock_dir: Path
    pipeline: str
    delivery_lease: str = "3s"
    heartbeat: float = HEARTBEAT
    lease_ttl: float = LEASE_TTL
    nodes: list[Node] = field(default_factory=list)

    def add(self, name: str) -> Node:
        folder = self.directory / name
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = folder / "ferry.toml"
        config.write_text(
            NODE.format(
                heartbeat=self.heartbeat,
                lease_ttl=self.lease_ttl,
                delivery_lease=self.delivery_lease,
                port=port,
                socket=self.sock_dir / f"{name}.sock",
            )
            + self.pipeline.replace("{node}", name),
            encoding="utf-8",
        )
        daemon = Daemon(config, folder / "ferry.log", env={"FERRY_DATABASE_URL": self.url})
        node = Node(name, config, port, daemon)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.daemon.stop()

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def holder(self, lease: str) -> str | None:
        """The node holding `lease` now (database clock), by node name (its port), or None."""
        rows = self.query("SELECT holder FROM ferry_leases WHERE name = %s AND expires_at > now()", lease)
        if not rows or rows[0][0] is None:
            return None
        port = int(str(rows[0][0]).rpartition(":")[2])
        return next((node.name for node in self.nodes if node.port == port), None)

    def taken_after_beat(self, lease: str, dead: Node) -> float:
        """Seconds from `dead`'s last heartbeat to `lease`'s acquisition by another node, both on
        the database's clock.

        A beat renews the node's leases in its own transaction, so at one `now()`: the dead node's
        lease expired `lease_ttl` after its last beat, and the failover bound is about this span,
        free of the test's own polling and of where between two beats the kill fell."""
        rows = self.query(
            "SELECT extract(epoch FROM l.acquired_at - n.heartbeat_at)::float8"
            " FROM ferry_leases AS l, ferry_nodes AS n WHERE l.name = %s AND n.id LIKE %s",
            lease,
            f"%:{dead.port}",
        )
        assert len(rows) == 1, rows
        return float(rows[0][0])


def lines(path: Path) -> Iterator[dict[str, Any]]:
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):
                yield json.loads(line)
