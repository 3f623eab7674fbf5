"""Private ``redis-server`` processes for tests: free port, no persistence, torn down after.

Tests that kill, restart, flush or partition Redis use one of these, never the machine's shared
Redis on 6379. The class is the demo's (one implementation for demo, tests and benchmarks).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from examples.dashboard.redis_server import PrivateRedis as RedisServer
from examples.dashboard.redis_server import free_port

__all__ = ["RedisServer", "free_port", "hung"]


@contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """The server process stopped (SIGSTOP: its sockets stay open, nothing answers) for the
    block, resumed after (SIGCONT), however the block ends."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
