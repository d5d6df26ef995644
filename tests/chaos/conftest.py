"""Fixtures of the chaos scenarios."""

from tests.e2e.conftest import sock_dir

__all__ = ["sock_dir"]
