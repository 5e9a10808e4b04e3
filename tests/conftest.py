"""Shared pytest configuration."""

from collections.abc import Iterator

import pytest
from cachevault_tools.local.redis_process import ChildReaper

pytest_plugins = ["tests.redis_fixtures", "tests.product_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def reap_nodes() -> Iterator[None]:
    """Nodes this test process started and something else stopped are waited for: no zombies pile up."""
    reaper = ChildReaper().start()
    try:
        yield
    finally:
        reaper.stop()
