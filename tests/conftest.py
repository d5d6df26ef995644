"""Fixtures shared across the suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from daemon.store.sqlite import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A running store on a real SQLite file under tmp_path."""
    store = Store.open(tmp_path / "ferry.db", durability="normal")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()
    store.close()
