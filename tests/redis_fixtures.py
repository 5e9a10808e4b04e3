"""Shared fixtures for tests that need real local redis-server nodes.

``redis_fleet`` is one Fleet per test session (its state under the pytest tmp dir; every
node stopped at the end). ``make_cache`` creates caches in it that are destroyed when
the test ends; ``redis_node`` is a single bare node.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault_tools.local.fleet import CacheLayout, Fleet
from cachevault_tools.local.redis_process import RedisProcess, start_node

_names = itertools.count(1)


def own_fleet(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Fleet]:
    """Body of a fleet fixture: a Fleet under a fresh tmp dir, every node stopped at teardown."""
    fleet = Fleet(tmp_path_factory.mktemp(name))
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="session")
def redis_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from own_fleet(tmp_path_factory, "fleet")


@pytest.fixture
def make_cache(redis_fleet: Fleet) -> Iterator[Callable[..., CacheLayout]]:
    """``make_cache(cluster_mode=..., num_shards=..., replicas_per_shard=...)`` -> CacheLayout."""
    created: list[str] = []

    def make(prefix: str = "t", **kwargs: Any) -> CacheLayout:
        name = f"{prefix}-{next(_names)}"
        created.append(name)
        return redis_fleet.create_cache(name, **kwargs)

    yield make
    for name in created:
        if (redis_fleet.caches_dir / name).exists():
            redis_fleet.destroy_cache(name)


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisProcess]:
    node = start_node(tmp_path / "redis-node")
    yield node
    node.stop()
