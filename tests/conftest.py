"""Shared pytest configuration."""

pytest_plugins = ["tests.redis_fixtures", "tests.product_fixtures"]
