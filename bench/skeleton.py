"""The design's floor for per-event delivery and pipeline ingest: DESIGN.md's pipeline as bare trio tasks.

    .venv/bin/python -m bench.skeleton --db PATH --url URL [--batch]  # prints its port, runs till stdin ends

What it is: the least a process can do and still keep DESIGN.md's contract for a webhook source,
one jq transform and an HTTP sink (per-event, or batching with `--batch`), built from ferry's own
parts where they are the floor:

- **listener**: h11 on trio, one task per connection (as `bench.listener_bench.bare_handler`,
  but reading and writing on the socket's descriptor with ferry's `PlainStream`, which is cheaper);
  each POST body goes over a bounded memory channel to the ingest tasks, and is answered 202
  only once the commit holding it has returned (503 if the store refused it);
- **ingest**: `FLUSHERS` tasks (as ferry's `IngestBatcher`), each taking everything waiting in
  the channel into one `insert_events` of ferry's store (`daemon.store.sqlite.Store`: its writer
  thread, group commit, WAL, `synchronous=FULL`), which wakes the transform;
- **transform**: one task reading committed events after its cursor, mapping them with the
  benchmark's jq program (`TransformProgram`) and committing outputs, deliveries and cursor in
  one `commit_transform`, which wakes the sink; an event jq fails on is dead-lettered;
- **sink**: a fetcher reading due deliveries (`due_deliveries`) into a bounded channel, and
  `CONCURRENCY` workers each posting one delivery with `LeanClient` (the delivery id as
  `Idempotency-Key`), then waiting for its outcome to commit before taking the next; ferry's
  `OutcomeCommitter` groups the outcomes that finish together, merged into one `record_outcomes`.
  2xx is delivered, other 4xx dead, anything else retried 1 s later. A row stays in flight until
  its outcome has committed and a later fetch has begun (as ferry's `Fetcher`), so one process
  never sends a delivery twice;
- **batching sink** (`--batch`, as bench.cpu's pipeline daemon: `batch = { max_items = 500,
  max_wait = "20ms" }`, concurrency 8): the fetcher reads up to 8 x 500 due deliveries beyond
  those in flight and hands them on in chunks of up to `BATCH_ITEMS`; `BATCH_CONCURRENCY`
  workers each top a chunk up to `BATCH_ITEMS` with what arrives within `BATCH_WAIT_S` (as
  ferry's `Sink._fill`) and post the payloads as one JSON array (`[p1,p2,...]`, the body of
  ferry's batching http sink) under the batch's key (ferry's `batch_key`); the status judges
  every delivery of the batch alike, and its outcomes go to the committer as one entry (one
  `record_outcomes`, merged with whatever finished beside it).

What it is not: no config, routing, paths, limits or timeouts on the listener, no metrics, logs,
traces or taps, no supervisor or restarts, no quarantine, no guard, breaker or rate limit, no
backoff schedule, no attempt latency or answer excerpt stored, no pruning. Every one of those is
something ferry adds to the design; what this process spends per event is what the design costs.
Nor, batching: a byte limit per batch, per-item outcomes, an envelope, bisecting a poison batch.
`bench.cpu` measures it beside the daemons (its "design's floor" rows: per-event, and `--batch`
under the pipeline daemon's load), run by `bench.harness.Skeleton`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import h11
import msgspec
import trio

from actors.sink.commit import Finished, OutcomeCommitter
from actors.sink.fetcher import top_up
from actors.sink.http import batch_key
from actors.transform.config import TransformConfig
from actors.transform.program import Failure, TransformProgram
from actors.webhook.plain import PlainStream
from bench.harness import RESHAPE, SINK, SOURCE
from daemon.errors import DeliveryError, PermanentDelivery, StoreUnavailable
from daemon.http.client import LeanClient
from daemon.store.api import Attempt
from daemon.store.outbox import Derived, Due, Incoming, Outcomes, StoredEvent
from daemon.store.sqlite import Store

TRANSFORM = "shape"
CONCURRENCY = 16  # the sink's workers, as bench.cpu's per-event daemon
BATCH_CONCURRENCY = 8  # with --batch: the workers, items per request and wait to fill one,
BATCH_ITEMS = 500  # as bench.cpu's pipeline daemon
BATCH_WAIT_S = 0.020
FLUSHERS = 2  # ingest writes in the store at once, as ferry's IngestBatcher
PENDING = 1024  # requests waiting for an ingest task, at most
BATCH = 1000  # events a transform reads at a time, as ferry's Transformer
RETRY_S = 1.0
TIMEOUT_S = 10.0
DEDUP_WINDOW_S = 86400.0
HEADERS = [(b"content-type", b"application/json")]


class Request:
    """One POST body waiting for the commit that holds it."""

    __slots__ = ("body", "done", "event_id")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.done = trio.Event()
        self.event_id: str | None = None  # None once done: the store refused it


async def handle(stream: trio.SocketStream, inbox: trio.MemorySendChannel[Request]) -> None:
    """One connection: each request's body is stored, then answered 202 (503 if it was not)."""
    conn = h11.Connection(h11.SERVER)
    plain = PlainStream(stream)  # ferry's listener's reads and writes on the descriptor
    body: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await plain.receive_some(65536))
            elif type(event) is h11.Data:
                body.append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                request = Request(b"".join(body))
                body = []
                await inbox.send(request)
                await request.done.wait()
                status, answer = (
                    (202, b'{"id":"%s"}' % request.event_id.encode())
                    if request.event_id
                    else (503, b'{"error":"store unavailable"}')
                )
                headers = [*HEADERS, (b"content-length", b"%d" % len(answer))]
                await plain.send_all(
                    conn.send(h11.Response(status_code=status, headers=headers))
                    + conn.send(h11.Data(data=answer))
                    + conn.send(h11.EndOfMessage())
                )
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed:
                return
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def ingest(store: Store, inbox: trio.MemoryReceiveChannel[Request]) -> None:
    """Store everything waiting in `inbox` in one write, answer each, and again."""
    async for first in inbox:
        batch = [first]
        while True:
            try:
                batch.append(inbox.receive_nowait())
            except trio.WouldBlock:
                break
        incoming = [Incoming(SOURCE, request.body, None, ()) for request in batch]
        try:
            results = await store.insert_events(incoming, dedup_window=DEDUP_WINDOW_S, wake=(TRANSFORM,))
            for request, (event_id, _) in zip(batch, results, strict=True):
                request.event_id = event_id
        except StoreUnavailable:
            pass
        finally:
            for request in batch:
                request.done.set()


async def transform(store: Store, program: TransformProgram) -> None:
    """Map every committed event after the cursor; commit outputs, deliveries and cursor together."""
    signal = store.signal(TRANSFORM)
    position = await store.cursor(TRANSFORM)
    while True:
        events = await store.read_events([SOURCE], position, BATCH)
        if not events:
            await signal.wait()
            continue
        outputs: list[Derived] = []
        failures: list[tuple[StoredEvent, str]] = []
        results = program.map([event.payload for event in events])
        events = events[: len(results)]  # a prefix, past BATCH_OUTPUTS
        for event, result in zip(events, results, strict=True):
            if isinstance(result, Failure):
                failures.append((event, result.message))
            else:
                outputs.extend(
                    Derived(event, nth, payload, sinks) for nth, (payload, sinks) in enumerate(result)
                )
        position = events[-1].seq
        await store.commit_transform(TRANSFORM, position, outputs, failures, [SINK], wake=(SINK,))


class Sink:
    """A fetcher and workers sending what it fetched: one delivery per request, or with `batch`
    up to `BATCH_ITEMS` per request as one JSON array (module docstring)."""

    def __init__(self, store: Store, url: str, *, batch: bool = False) -> None:
        self._store = store
        self._url = url
        self._batch = batch
        self._workers = BATCH_CONCURRENCY if batch else CONCURRENCY
        self._chunk = BATCH_ITEMS if batch else 1
        self._client = LeanClient(max_idle_per_host=self._workers)
        self._inflight: set[int] = set()
        self._settled: set[int] = set()
        self._committer = OutcomeCommitter(
            self._record, wake=lambda entries: (), settle=self._settle, committed=lambda entries: None
        )

    async def run(self) -> None:
        send, receive = trio.open_memory_channel[list[Due]](self._workers)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._committer.run)
                for _ in range(self._workers):
                    nursery.start_soon(self._worker, receive.clone())
                await self._fetch(send)
        finally:
            with trio.CancelScope(shield=True):
                await self._client.aclose()

    async def _fetch(self, channel: trio.MemorySendChannel[list[Due]]) -> None:
        signal, inflight, chunk = self._store.signal(SINK), self._inflight, self._chunk
        ahead = self._workers * chunk
        while True:
            settled, self._settled = self._settled, set()
            inflight.difference_update(settled)
            rows = await self._store.due_deliveries(SINK, time.time(), len(inflight) + ahead)
            fresh = [row for row in rows if row.rowid not in inflight]
            inflight.update(row.rowid for row in fresh)
            for start in range(0, len(fresh), chunk):  # a channel op per batch, not per row
                await channel.send(fresh[start : start + chunk])
            if len(fresh) < ahead:
                with trio.move_on_after(RETRY_S):  # retries come due without a signal
                    await signal.wait()

    async def _worker(self, channel: trio.MemoryReceiveChannel[list[Due]]) -> None:
        headers = [("content-type", "application/json"), ("Idempotency-Key", "")]
        leftover: list[Due] = []
        while True:
            if leftover:
                rows, leftover = leftover, []
            else:
                try:
                    rows = await channel.receive()
                except trio.EndOfChannel:
                    return
            if self._batch:
                batch, leftover = await fill(rows, channel)
                headers[1] = ("Idempotency-Key", batch_key(batch))
                body = b"[" + b",".join(due.payload for due in batch) + b"]"
            else:
                batch = rows
                headers[1] = ("Idempotency-Key", batch[0].id)
                body = batch[0].payload
            rowids = [due.rowid for due in batch]
            try:
                response = await self._client.request(
                    "POST", self._url, headers=headers, body=body, timeout=TIMEOUT_S
                )
                outcomes = judge(rowids, response.status)
            except DeliveryError as exc:
                outcomes = judge(rowids, exc.status, str(exc), permanent=isinstance(exc, PermanentDelivery))
            await self._committer.commit(Finished(batch, outcomes, None, 0.0, None))

    async def _record(self, attempts: Sequence[Attempt], wake: Sequence[str]) -> None:
        merged = Outcomes([], [], [])
        for outcomes, _, _ in attempts:
            merged.delivered.extend(outcomes.delivered)
            merged.retry.extend(outcomes.retry)
            merged.dead.extend(outcomes.dead)
        await self._store.record_outcomes([(merged, None, None)], wake=wake)

    def _settle(self, entries: Sequence[Finished]) -> None:
        self._settled.update(due.rowid for entry in entries for due in entry.batch)


async def fill(rows: list[Due], channel: trio.MemoryReceiveChannel[list[Due]]) -> tuple[list[Due], list[Due]]:
    """Top `rows` up to `BATCH_ITEMS` with what the fetcher hands in within `BATCH_WAIT_S` (ferry's
    `top_up`, as `Sink._fill`, without its byte limit); return (the batch to send, rows left over)."""
    rows = await top_up(rows, channel, BATCH_ITEMS, BATCH_WAIT_S)
    return rows[:BATCH_ITEMS], rows[BATCH_ITEMS:]


def judge(
    rowids: Sequence[int], status: int | None, error: str | None = None, *, permanent: bool = False
) -> Outcomes:
    """The outcome of one request for every delivery it carried: 2xx delivered; other 4xx (but
    408, 425, 429) or a `permanent` error dead; anything else (other statuses, transport errors)
    retried `RETRY_S` later."""
    if status is not None and 200 <= status < 300:
        return Outcomes([(rowid, status) for rowid in rowids], [], [])
    why = error or f"HTTP {status}"
    if permanent or (status is not None and 400 <= status < 500 and status not in (408, 425, 429)):
        return Outcomes([], [], [(rowid, status, why) for rowid in rowids])
    at = time.time() + RETRY_S
    return Outcomes([], [(rowid, at, status, why) for rowid in rowids], [])


async def serve(
    db: Path, url: str, *, batch: bool = False, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the pipeline on 127.0.0.1 (a free port, handed to `task_status`) until cancelled;
    `batch`: the sink sends batches (module docstring)."""
    program = TransformProgram(msgspec.convert({"inputs": [SOURCE], "map": RESHAPE}, TransformConfig))
    store = Store.open(db, durability="full")
    try:
        async with trio.open_nursery() as outer:
            await outer.start(store.run)
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel[Request](PENDING)
                for _ in range(FLUSHERS):
                    nursery.start_soon(ingest, store, receive.clone())
                nursery.start_soon(transform, store, program)
                nursery.start_soon(Sink(store, url, batch=batch).run)
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
                await nursery.start(trio.serve_listeners, lambda stream: handle(stream, send), listeners)
                task_status.started(listeners[0].socket.getsockname()[1])
            outer.cancel_scope.cancel()
    finally:
        store.close()


async def main_async(db: Path, url: str, batch: bool) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, batch=batch), db, url)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # until the parent goes
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.skeleton", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="the SQLite outbox (created if missing)")
    parser.add_argument("--url", required=True, help="where the sink posts each delivery")
    parser.add_argument(
        "--batch",
        action="store_true",
        help=f"batches of up to {BATCH_ITEMS} deliveries ({BATCH_WAIT_S * 1000:g} ms to fill), "
        f"{BATCH_CONCURRENCY} workers",
    )
    args = parser.parse_args(argv)
    trio.run(main_async, args.db, args.url, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
