"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder for control sockets (a Unix socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ferry-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
