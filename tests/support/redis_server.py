"""Private ``redis-server`` processes for tests: free port, no persistence, torn down after.

Tests that kill, restart, flush or partition Redis use one of these, never the machine's shared
Redis on 6379. The class is the demo's (one implementation for demo, tests and benchmarks).
"""

from __future__ import annotations

from examples.dashboard.redis_server import PrivateRedis as RedisServer
from examples.dashboard.redis_server import free_port

__all__ = ["RedisServer", "free_port"]
