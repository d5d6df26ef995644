"""The ingest batcher's count of events received (`ferry ctl status` rates, systemd STATUS)."""

from __future__ import annotations

import trio

from actors.webhook.ingest import IngestBatcher
from daemon.store.sqlite import Store


async def test_events_counts_stored_events_not_duplicates(store: Store, nursery: trio.Nursery) -> None:
    batcher = IngestBatcher(store, sinks={"demo": []}, consumers={}, dedup_window=3600)
    await nursery.start(batcher.run)
    first = await batcher("demo", b'{"n":1}', "key-1", None)
    again = await batcher("demo", b'{"n":1}', "key-1", None)
    other = await batcher("demo", b'{"n":2}', None, None)
    assert (first[1], again[1], other[1]) == (False, True, False)
    assert again[0] == first[0]
    assert batcher.events == 2
