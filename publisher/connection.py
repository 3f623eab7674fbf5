"""The publisher's held-connection lane (:class:`DirectCommands`, :class:`AsyncDirectCommands`).

Building clients from URLs lives in :mod:`redisconn`, shared with the gateway; its functions
are re-exported here for existing imports.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import redis
import redis.asyncio

from redisconn import (
    CONNECT_TIMEOUT,
    RETRIES,
    SOCKET_TIMEOUT,
    async_client,
    defer_refresh_after_timeouts,
    is_cluster_url,
    sync_client,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "RETRIES",
    "SOCKET_TIMEOUT",
    "AsyncDirectCommands",
    "DirectCommands",
    "OutOfStep",
    "async_client",
    "defer_refresh_after_timeouts",
    "idle_limit",
    "is_cluster_url",
    "sync_client",
]


class DirectCommands:
    """Run pre-packed commands on connections held outside redis-py's command layer.

    ``Redis.execute_command`` takes a connection from the pool and gives it back on every call,
    and the pool checks each connection it hands out with a ``poll()`` system call, besides
    recording metrics: on a single ``publish`` that was about 30 µs of a 100 µs round trip on our
    benchmark machine. A publisher keeps its own stack of idle connections instead (taken from
    the client's pool once, so the pool's limits and connection settings, such as password,
    TLS, database and timeouts, still apply) and runs each call as one send and one read.

    This lane makes one attempt and no retry: on a connection error or timeout the connection is
    dropped and the error raised, and the caller repeats the call (the publish script's retry
    guard makes that repeat safe). Taking a new connection from the pool connects with the
    client's own connect policy (one connect for the clients the publisher builds). Reply errors
    leave the connection in a clean state and keep it.

    The pool counts a held idle connection as in use, so the lane keeps at most
    :func:`idle_limit` of them and gives the others back after their call: the pool always has
    room for the calls that go through redis-py (loading the script after ``NOSCRIPT``,
    ``publish_many``, ``presence``, your own commands on the client). Before, a burst of as many
    concurrent calls as the pool's limit (redis-py's default: 100) left every connection held
    here: those calls failed with "Too many connections" for the publisher's life, and on a
    ``BlockingConnectionPool`` they waited for ever.

    Thread-safe: a connection is used by one call at a time (``list.pop``/``append`` are atomic).
    A forked child starts with no idle connections, never sharing its parent's sockets.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[redis.connection.AbstractConnection] = []
        self._max_idle = idle_limit(self._pool)
        _lanes.add(self)

    @staticmethod
    def supports(client: object) -> bool:
        """Standalone clients with a pool of their own (not a single-connection client)."""
        return (
            isinstance(client, redis.Redis)
            and client.connection is None
            and isinstance(client.connection_pool, redis.ConnectionPool)
        )

    def execute(self, packed: bytes, valid: Callable[[object], bool] | None = None):
        """Send one packed command and return its parsed reply (raises its error reply).

        ``valid``: whether a reply is one the command can have: another one raises
        :class:`OutOfStep` and the connection is dropped. A held connection is not checked for
        unread data when it is taken again (redis-py's pool checks each one it hands out: part
        of the cost this lane saves), so a stray reply (a broken proxy's) left every later
        command on it reading the reply of the command before. A connection that answered with
        an error goes back to the pool, which checks it."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._pool.get_connection()
        try:
            conn.send_packed_command((packed,))
            reply = conn.read_response()
            if valid is not None and not valid(reply):
                raise _out_of_step(reply)
        except redis.exceptions.ResponseError:
            # A complete error reply, or a stray one (a broken proxy's) before the real reply:
            # back to redis-py's pool, whose check for unread data tells them apart when it
            # hands the connection out again (error replies are rare: the check costs nothing).
            self._pool.release(conn)
            raise
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        self._keep(conn)
        return reply

    def _keep(self, conn: redis.connection.AbstractConnection) -> None:
        # (Checked, then appended: two threads may both pass, one connection over the limit.)
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            self._pool.release(conn)

    def close(self) -> None:
        """Give the idle connections back to the client's pool."""
        while self._idle:
            self._pool.release(self._idle.pop())

    def _forget(self) -> None:
        self._idle = []


class AsyncDirectCommands:
    """:class:`DirectCommands` for ``redis.asyncio`` clients (same rules; a call cancelled
    half-way drops its connection, which may hold half a reply)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[redis.asyncio.connection.AbstractConnection] = []
        self._max_idle = idle_limit(self._pool)
        _lanes.add(self)

    @staticmethod
    def supports(client: object) -> bool:
        return (
            isinstance(client, redis.asyncio.Redis)
            and client.connection is None
            and isinstance(client.connection_pool, redis.asyncio.ConnectionPool)
        )

    async def execute(self, packed: bytes, valid: Callable[[object], bool] | None = None):
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command((packed,))
            reply = await conn.read_response()
            if valid is not None and not valid(reply):
                raise _out_of_step(reply)
        except redis.exceptions.ResponseError:
            await self._pool.release(conn)
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)
            raise
        await self._keep(conn)
        return reply

    async def _keep(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await self._pool.release(conn)

    async def aclose(self) -> None:
        while self._idle:
            await self._pool.release(self._idle.pop())

    def _forget(self) -> None:
        self._idle = []


class OutOfStep(redis.exceptions.InvalidResponse):
    """A held connection answered what its command cannot have: the connection was dropped
    (its replies may answer the commands before them from then on)."""


def _out_of_step(reply: object) -> OutOfStep:
    return OutOfStep(f"a reply the command cannot have: {reply!r}"[:120] + " (connection dropped)")


def idle_limit(pool: object) -> int:
    """How many idle connections a lane may hold out of ``pool``: half its limit (rounded
    down), so that at least half is always left to the calls that go through redis-py. A pool of
    one connection gets none held: each call takes it and gives it back."""
    limit = getattr(pool, "max_connections", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return 0  # an unknown pool: hold nothing, as redis-py itself would
    return limit // 2


_lanes: weakref.WeakSet[DirectCommands | AsyncDirectCommands] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lane in list(_lanes):
        lane._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
