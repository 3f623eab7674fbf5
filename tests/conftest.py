"""Shared fixtures.

Real-Redis tests run against a private ``redis-server`` started for the session on a free port
(flushed before each test), so the suite never touches the machine's Redis on 6379.
"""

from __future__ import annotations

import asyncio
import os

import fakeredis
import pytest
import redis
import uvloop
from hypothesis import settings

import schemas.stored
from tests.support.redis_server import RedisServer

pytest_plugins = ["tests.support.cluster_fixtures"]

# Local runs explore new examples each time; CI draws the same ones, so that a green commit stays
# green (a property test's rare counterexample is found locally, not by an unrelated CI run).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: Test modules whose async tests run twice, on asyncio's loop (the gateway's default) and on
#: uvloop (``--loop uvloop``): the end-to-end ones, which drive the transports' callbacks (EOF,
#: pause/resume, half-close, slow readers, the SSE takeover) with real sockets. Every other
#: in-process test, and every gateway process unless a test says otherwise, runs on asyncio's.
BOTH_LOOPS = {
    "test_gateway",
    "test_gateway_http",
    "test_sse",
    "test_sse_faults",
    "test_revocation_gateway",
}


def pytest_asyncio_loop_factories(config, item):
    # asyncio_loop_only: a case that only asyncio's transports can set up (say so in the test).
    both = item.get_closest_marker("asyncio_loop_only") is None
    if both and item.module.__name__.rpartition(".")[2] in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


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


@pytest.fixture
async def publisher(redis_url):
    """An AsyncPublisher on the clean private Redis."""
    from publisher import AsyncPublisher

    pub = AsyncPublisher.from_url(redis_url)
    yield pub
    await pub.aclose()


@pytest.fixture
def bus(redis_url):
    """A (synchronous) ``Publisher`` on the clean real Redis of ``redis_url``."""
    from publisher import Publisher

    publisher = Publisher.from_url(redis_url)
    yield publisher
    publisher.close()


@pytest.fixture
async def gateways(redis_url):
    """Start in-process gateways on free ports (``await gateways(**config overrides)``); all are
    drained at the end of the test."""
    from tests.support.gateway_client import start_gateway

    started = []

    async def start(**overrides):
        gateway = await start_gateway(overrides.pop("redis_url", redis_url), **overrides)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if not gateway.draining:
            await gateway.drain()


@pytest.fixture
def frame_checks(monkeypatch) -> list[int]:
    """The seqs whose frame ``schemas.stored`` checks, in order (the check itself still runs)."""
    checked: list[int] = []
    check = schemas.stored._check_frame

    def counting(frame, kind, project, tail):
        checked.append(int(tail[len(b',"seq":') : -1]))
        return check(frame, kind, project, tail)

    monkeypatch.setattr(schemas.stored, "_check_frame", counting)
    return checked
