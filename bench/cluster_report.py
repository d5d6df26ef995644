"""The rows of `bench.cluster` and its projection of N nodes on N machines (pure: figures in, rows out).

Projection, from the PostgreSQL runs' medians:
    node ceiling     1e6 / (daemon CPU us per event): one node on a core of its own;
    server ceiling   C x 1e6 / (server CPU us per event) for a database server with C cores;
    serial ceiling   ingest transactions are serialised across nodes by the events lock (events
                     commit in seq order, so cursors never skip one); groups grow under load, so
                     the serial work per event tends to the backend's CPU per stored event, and
                     ingest cannot pass 1e6 / that, however many nodes and database cores;
    N nodes reach    min(N x node ceiling, server ceiling, serial ceiling): linear in N (the
                     issue's >= 0.8x per node) until the smaller database ceiling.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.report import Row

INGEST_RATIO_TARGET = 0.5
SCALING_TARGET = 0.8
SERVER_CORES = (2, 8)  # database servers the projection is given for


def _median(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def projection(figures: dict[str, Any], workload: str) -> dict[str, Any]:
    """Ceilings (events/s) of `workload` ("ingest" or "per_event") on N nodes, from CPU per event."""
    pg = figures[workload]["postgres"]
    daemon_us, server_us = _median(pg, "daemon_cpu_us"), _median(pg, "server_cpu_us")
    node = 1e6 / daemon_us if daemon_us else None
    servers = {cores: cores * 1e6 / server_us if server_us else None for cores in SERVER_CORES}
    # Ingest transactions hold the events lock from their first insert to their commit: one at a
    # time, cluster-wide. Groups grow under load (round trips and the WAL flush are shared by more
    # events), so the serial work per event tends to the backend's CPU per event.
    ingest_server_us = _median(figures["ingest"]["postgres"], "server_cpu_us")
    serial = 1e6 / ingest_server_us if workload == "ingest" and ingest_server_us else None
    out: dict[str, Any] = {"node": node, "server": servers, "serial": serial, "nodes": {}}
    for n in (1, 2, 4, 8, 16):
        limits = [x for x in (n * node if node else None, servers[SERVER_CORES[-1]], serial) if x]
        out["nodes"][n] = min(limits) if limits else None
    return out


def rows(figures: dict[str, Any]) -> list[Row]:
    ingest = figures["ingest"]
    lite, pg = _median(ingest["sqlite"], "rps"), _median(ingest["postgres"], "rps")
    table = [
        Row("cluster: durable ingest, one node on SQLite (median)", lite, "req/s"),
        Row(
            "cluster: durable ingest, one node on PostgreSQL (median)",
            pg,
            "req/s",
            lite,
            _ratio(pg, lite),
            f">= {INGEST_RATIO_TARGET:g}x SQLite",
            (_ratio(pg, lite) or 0) >= INGEST_RATIO_TARGET,
        ),
    ]
    for key, label in (("per_event", "per-event delivery"), ("drain", "backlog drain, batching sink")):
        a, b = _median(figures[key]["sqlite"], "events_s"), _median(figures[key]["postgres"], "events_s")
        table.append(Row(f"cluster: {label}, SQLite (median)", a, "events/s"))
        table.append(Row(f"cluster: {label}, PostgreSQL (median)", b, "events/s", a, _ratio(b, a)))
    for key, label, unit in (
        ("daemon_cpu_us", "daemon CPU per stored event", "us"),
        ("server_cpu_us", "PostgreSQL backends' CPU per stored event", "us"),
        ("round_trips", "round trips to PostgreSQL per stored event", "RT"),
        ("transactions", "PostgreSQL transactions per stored event", "xact"),
    ):
        table.append(
            Row(f"cluster: ingest on PostgreSQL, {label} (median)", _median(ingest["postgres"], key), unit)
        )
    table.append(
        Row(
            "cluster: ingest on SQLite, daemon CPU per stored event (median)",
            _median(ingest["sqlite"], "daemon_cpu_us"),
            "us",
        )
    )
    pe = figures["per_event"]["postgres"]
    for key, label, unit in (
        ("daemon_cpu_us", "daemon CPU per delivered event", "us"),
        ("server_cpu_us", "PostgreSQL backends' CPU per delivered event", "us"),
        ("round_trips", "round trips per delivered event", "RT"),
    ):
        table.append(
            Row(f"cluster: per-event delivery on PostgreSQL, {label} (median)", _median(pe, key), unit)
        )
    one, two = statistics.median(figures["nodes"]["one"]), statistics.median(figures["nodes"]["two"])
    table.append(
        Row(
            f"cluster: ingest, two nodes vs one, one database, this {figures['cores']}-core box (median)",
            two,
            "req/s",
            one,
            two / one if one else None,
            "projected below (the box has no core for a second node)",
        )
    )
    table.append(
        Row("cluster: one commit on this server (synchronous_commit on, median)", figures["commit_ms"], "ms")
    )
    for workload, label in (("ingest", "durable ingest"), ("per_event", "per-event delivery")):
        seen = projection(figures, workload)
        node = seen["node"]
        table.append(Row(f"projection, {label}: one node on a core of its own", node, "events/s"))
        for cores, ceiling in seen["server"].items():
            table.append(
                Row(f"projection, {label}: database CPU ceiling, {cores} cores", ceiling, "events/s")
            )
        if seen["serial"]:
            table.append(
                Row(f"projection, {label}: events-lock ceiling (one backend)", seen["serial"], "events/s")
            )
        for n, value in seen["nodes"].items():
            per_node = value / (n * node) if value and node else None
            table.append(
                Row(
                    f"projection, {label}: {n} node(s) on {n} machines, {SERVER_CORES[-1]}-core database",
                    value,
                    "events/s",
                    node,
                    per_node,
                    f">= {SCALING_TARGET:g}x per node while the database has headroom" if n > 1 else "",
                    None,
                    baseline_unit="events/s one node",
                )
            )
    return table
