"""The cluster's metrics as one snapshot, for an alerter that runs on one node of several.

In cluster mode each node publishes its own metrics (`Snapshot`, the same readings its alerter
would see) to the shared database every `[alerting] interval` (`publish_forever`, started by
`daemon.assembly.publish_metrics`); the alerter, a singleton on one node, reads the live nodes'
snapshots (`cluster_view`) and evaluates every rule on
their merge (`ClusterMetrics.merge`), so `rate(deliveries{outcome="dead"}, 5m)` counts the dead
letters of every node, not one node's share.

How series merge:
    Counters and histograms are summed over the nodes, series by series (same name and
    attributes). A node's own totals drop when it restarts; summed as they are, that drop would
    read as a reset of the cluster's total and count every other node's total again as new. So
    the merge keeps, per node and series, what the node had counted before each drop (an
    offset) and adds it back: the cluster's total never goes down, and a node that restarted
    contributes only what it counted since. A node that stops publishing (dead, or left) keeps
    contributing its last totals, frozen, for the same reason.
    Gauges take the highest value of any node: the queue depth is the shared database's (every
    node reports the same), and for the others (memory, breaker state, poll failures, adaptive
    concurrency) a threshold rule asks whether any node is over it.

Bad input: a published snapshot that cannot be decoded is skipped with a warning (that node's
series keep their last totals); it never stops the alerter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import msgspec
import trio

from actors.alerting.expr import COUNTERS, HISTOGRAMS, Attributes, HistPoint, Reading, Snapshot
from daemon.errors import StoreUnavailable
from daemon.telemetry import metrics

log = logging.getLogger("ferry.alerts")

__all__ = ["ClusterMetrics", "cluster_view", "decode", "encode", "publish_forever"]

STALE_AFTER: Final = 3
"""A node whose last published metrics are older than this many intervals is left out of the
merge (its counters stay at their last totals): it died or was cut off."""

_Key = tuple[str, tuple[tuple[str, str], ...]]
"""A series: the metric's name and its attributes, sorted."""


class _Hist(msgspec.Struct, array_like=True):
    bounds: list[float]
    counts: list[int]
    count: int
    sum: float


class _Series(msgspec.Struct, array_like=True):
    attributes: dict[str, str]
    number: float | None = None
    hist: _Hist | None = None


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(dict[str, list[_Series]])


def encode(snapshot: Snapshot) -> bytes:
    """A node's snapshot as it is published (compact JSON)."""
    wire: dict[str, list[_Series]] = {}
    for name, series in snapshot.items():
        wire[name] = [_to_wire(attributes, reading) for attributes, reading in series]
    return _ENCODER.encode(wire)


def _to_wire(attributes: Attributes, reading: Reading) -> _Series:
    labels = {str(key): str(value) for key, value in attributes.items()}
    if isinstance(reading, HistPoint):
        hist = _Hist(list(reading.bounds), list(reading.counts), reading.count, reading.sum)
        return _Series(labels, hist=hist)
    return _Series(labels, number=float(reading))


def decode(data: bytes) -> Snapshot:
    """A published snapshot; raises `ValueError` when it is not one."""
    try:
        wire = _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a metrics snapshot: {exc}") from None
    snapshot: dict[str, list[tuple[Attributes, Reading]]] = {}
    for name, series in wire.items():
        readings: list[tuple[Attributes, Reading]] = []
        for one in series:
            if one.hist is not None:
                hist = one.hist
                if len(hist.counts) != len(hist.bounds) + 1:
                    raise ValueError(f"{name}: a histogram needs one count more than its bounds")
                readings.append(
                    (one.attributes, HistPoint(tuple(hist.bounds), tuple(hist.counts), hist.count, hist.sum))
                )
            elif one.number is not None:
                readings.append((one.attributes, one.number))
        snapshot[name] = readings
    return snapshot


class ClusterMetrics:
    """Merges the nodes' snapshots, evaluation after evaluation; see the module docstring.

    Keeps, per node and series, the last reading and the offset of the drops seen so far.
    """

    def __init__(self, kinds: Mapping[str, str] | None = None) -> None:
        self._kinds = dict(metrics.catalogue() if kinds is None else kinds)
        self._last: dict[str, dict[_Key, Reading]] = {}
        self._offset: dict[str, dict[_Key, Reading]] = {}

    def merge(self, published: Mapping[str, bytes | Snapshot]) -> Snapshot:
        """One snapshot of the whole cluster from each live node's latest (node id → snapshot,
        encoded or not). Nodes missing here keep their last counter and histogram totals."""
        gauges: dict[_Key, float] = {}
        for node, data in published.items():
            try:
                snapshot = decode(data) if isinstance(data, bytes) else data
            except ValueError as exc:
                log.warning(
                    "a node's metrics were skipped", extra={"fields": {"node": node, "error": str(exc)}}
                )
                continue
            self._take(node, snapshot, gauges)
        totals: dict[_Key, Reading] = {}
        for node, last in self._last.items():
            offsets = self._offset.get(node, {})
            for key, reading in last.items():
                value = _add(reading, offsets[key]) if key in offsets else reading
                totals[key] = _add(totals[key], value) if key in totals else value
        merged: dict[str, list[tuple[Attributes, Reading]]] = {}
        for (name, attributes), reading in (*totals.items(), *gauges.items()):
            merged.setdefault(name, []).append((dict(attributes), reading))
        return merged

    def _take(self, node: str, snapshot: Snapshot, gauges: dict[_Key, float]) -> None:
        last = self._last.setdefault(node, {})
        offsets = self._offset.setdefault(node, {})
        for name, series in snapshot.items():
            kind = self._kinds.get(name)
            for attributes, reading in series:
                key = (name, tuple(sorted((str(k), str(v)) for k, v in attributes.items())))
                if kind in COUNTERS or kind in HISTOGRAMS:
                    before = last.get(key)
                    if before is not None and _dropped(before, reading):
                        offsets[key] = _add(offsets[key], before) if key in offsets else before
                    last[key] = reading
                elif not isinstance(reading, HistPoint):
                    gauges[key] = max(gauges.get(key, reading), reading)


def _dropped(before: Reading, after: Reading) -> bool:
    if isinstance(before, HistPoint) or isinstance(after, HistPoint):
        if not isinstance(before, HistPoint) or not isinstance(after, HistPoint):
            return True
        return after.count < before.count or after.bounds != before.bounds
    return after < before


def _add(a: Reading, b: Reading) -> Reading:
    if isinstance(a, HistPoint) and isinstance(b, HistPoint):
        if a.bounds != b.bounds:
            return a  # buckets changed (a new version): the older totals cannot be added
        counts = tuple(x + y for x, y in zip(a.counts, b.counts, strict=True))
        return HistPoint(a.bounds, counts, a.count + b.count, a.sum + b.sum)
    if isinstance(a, HistPoint) or isinstance(b, HistPoint):
        return a
    return a + b


async def publish_forever(
    publish: Callable[[bytes], Awaitable[None]],
    collect: Callable[[], Snapshot | None],
    interval: Callable[[], float],
) -> None:
    """Every `interval()` s: this node's metrics to the shared database (`publish`), whenever
    `collect()` has any (None: no alert rules configured now). An unreachable database is logged
    once per outage and tried again at the next interval. Runs until cancelled."""
    failing = False
    while True:
        snapshot = collect()
        if snapshot is not None:
            try:
                await publish(encode(snapshot))
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("metrics not published to the cluster", extra={"fields": {"error": str(exc)}})
                failing = True
            else:
                if failing:
                    log.info("metrics published to the cluster again")
                failing = False
        await trio.sleep(interval())


def cluster_view(
    read: Callable[[float], Awaitable[dict[str, bytes]]], node: str, interval: float
) -> Callable[[Snapshot], Awaitable[Snapshot]]:
    """The alerter's `cluster`: this node's snapshot merged with what every other live node
    published (`read(max_age)`). With the database unreachable, the other nodes' counters stay
    at their last totals (their rates read 0 until it is back), with a warning."""
    merger = ClusterMetrics()

    async def merged(local: Snapshot) -> Snapshot:
        published: dict[str, bytes | Snapshot] = {}
        try:
            published.update(await read(STALE_AFTER * interval))
        except StoreUnavailable as exc:
            log.warning(
                "other nodes' metrics unavailable; rules see this node's",
                extra={"fields": {"error": str(exc)}},
            )
        published[node] = local
        return merger.merge(published)

    return merged
