"""Shared pytest configuration."""

import os
from collections.abc import Iterator

import pytest
from cachevault_tools.local.redis_process import ChildReaper

# What a shell holds to reach the user's own stack or account (`eval "$(cachevault local env)"`,
# README, Using it; AWS_* settings, profiles and config files, whose endpoint_url botocore
# follows too): the suite makes its own embedded AWS and nodes, as on CI, and must neither fail
# against a stack that is down nor write into one that is up.
USER_STACK_ENVIRONMENT = (
    "SNAPSHOT_BUCKET", "CACHEVAULT_HOME", "CACHEVAULT_LOCAL_PORT", "CACHEVAULT_TARGET", "CACHEVAULT_STACK",
    "CACHEVAULT_TEMPLATE", "CACHEVAULT_PARAMETER_OVERRIDES", "CACHEVAULT_LOCAL_IAM",
)  # fmt: skip
for _name in list(os.environ):
    if _name in USER_STACK_ENVIRONMENT or _name.startswith("AWS_"):
        del os.environ[_name]
os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull

pytest_plugins = ["tests.redis_fixtures", "tests.product_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def reap_nodes() -> Iterator[None]:
    """Nodes this test process started and something else stopped are waited for: no zombies pile up."""
    reaper = ChildReaper().start()
    try:
        yield
    finally:
        reaper.stop()
