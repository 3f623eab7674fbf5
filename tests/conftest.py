"""Shared fixtures.

Real-Redis tests run against a private ``redis-server`` started for the session on a free port
(flushed before each test), so the suite never touches the machine's Redis on 6379.
"""

from __future__ import annotations

import fakeredis
import pytest
import redis

from tests.support.redis_server import RedisServer

pytest_plugins = ["tests.support.cluster_fixtures"]


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a clean real Redis (the session's private server, flushed)."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def fake_redis():
    """A fakeredis server with Lua, for fast unit tests."""
    client = fakeredis.FakeRedis()
    yield client
    client.close()
