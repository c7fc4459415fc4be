"""Fixtures shared by the vault's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from vault import warehouse


@pytest.fixture
def con(wh: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A writable connection to the test module's warehouse (its own ``wh`` fixture)."""
    connection = warehouse.connect(wh)
    try:
        yield connection
    finally:
        connection.close()
