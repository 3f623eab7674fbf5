"""Asyncio Redis clients whose calls end in time by construction, whatever redis-py does inside.

Two things made one call on a hung server (it accepts the connection and never answers) last
far longer than its timeouts suggest:

* redis-py runs a connection's retry policy around a command, around the connect inside it and
  around the health-check ``PING`` inside that connect, each run with the full number of retries:
  with 3 retries and a 5 s read timeout, one ``GET`` took 16 timeouts, 84 s. :class:`CallRetry`
  retries at the outermost run only: a run nested in another (in the same task) makes one
  attempt and hands its error to the outer run, which decides. A hung server then costs one
  read timeout per attempt, and a fast failure (a refused connection while Redis restarts) is
  still retried, as before.
* Nothing bounded a call as a whole: a server that answers each read just before the read
  timeout, or a cluster client that reloads its slot map from one hung node after the other,
  could hold a call for as long as that goes on. A client built with a ``call_timeout``
  (:class:`BoundedRedis`, :class:`BoundedRedisCluster`) runs every call, that is one command, one
  registered script's call (with the script load a ``NOSCRIPT`` answer causes) or one pipeline's
  ``execute``, under ``asyncio.timeout(call_timeout)``, and raises
  ``redis.exceptions.TimeoutError`` when it runs out; the connection it was using is dropped
  (redis-py disconnects a connection whose read was cancelled). Within such a call, CallRetry
  makes a retry only when the attempt after it can end before the call's deadline.

Pub/sub (``client.pubsub()``) is not bounded this way: its reads wait for messages on purpose,
and a frame sent a byte at a time can hold them for as long as it goes on (redis-py's health check
sends a ``PING`` and waits for no pong). Its users bound it with a probe of their own, a ping
whose pong must come back in time (the gateway's ``PubSubLink``, ``PresenceService``'s own
listener).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.client
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.exceptions
from redis.commands.core import AsyncScript

__all__ = ["BoundedRedis", "BoundedRedisCluster", "CallRetry", "within"]

T = TypeVar("T")

#: Loop time by which the bounded call running in this task must end (None: not in one).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "redisconn_call_deadline", default=None
)
#: True while a CallRetry run is under way in this task: a run started then is nested.
_in_run: contextvars.ContextVar[bool] = contextvars.ContextVar("redisconn_in_run", default=False)


async def within(bound: float | None, call: Awaitable[T]) -> T:
    """Await ``call``, ending it with ``redis.exceptions.TimeoutError`` after ``bound`` seconds
    (None: no bound). Inside another bounded call, the outer deadline applies alone, so the
    calls a call makes (a script's ``SCRIPT LOAD``) share its bound."""
    if bound is None or _deadline.get() is not None:
        return await call
    token = _deadline.set(asyncio.get_running_loop().time() + bound)
    try:
        async with asyncio.timeout(bound) as scope:
            return await call
    except TimeoutError:
        if scope.expired():
            raise redis.exceptions.TimeoutError(
                f"no answer from Redis within {bound:g} s"
            ) from None
        raise
    finally:
        _deadline.reset(token)


class CallRetry(redis.asyncio.retry.Retry):
    """redis-py's retry policy, applied once per call instead of once per nesting level.

    A run of :meth:`call_with_retry` nested in another one in the same task (the connect inside
    a command, the health check inside a connect) makes one attempt and lets its error reach the
    outer run, which retries up to ``retries`` times with the backoff's pauses. Inside a call
    bounded by :func:`within`, a retry is made only when ``attempt_timeout`` seconds (what one
    attempt takes when Redis does not answer: a connect and a read timeout) still fit before
    the call's deadline after the pause, so a timed-out attempt is not followed by one that would
    be cut off anyway, while quick failures are retried as usual.
    """

    def __init__(
        self,
        backoff: Any,
        retries: int,
        *,
        attempt_timeout: float,
        supported_errors: tuple[type[redis.exceptions.RedisError], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        ),
    ) -> None:
        super().__init__(backoff, retries, supported_errors)
        self.attempt_timeout = attempt_timeout

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        nested = _in_run.get()
        token = _in_run.set(True)
        try:
            self._backoff.reset()
            failures = 0
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    if with_failure_count:
                        await fail(error, failures)
                    else:
                        await fail(error)
                    pause = self._backoff.compute(failures)
                    if nested or not self._may_retry(failures, pause):
                        raise error
                    if pause > 0:
                        await asyncio.sleep(pause)
        finally:
            _in_run.reset(token)

    def _may_retry(self, failures: int, pause: float) -> bool:
        if 0 <= self._retries < failures:
            return False
        deadline = _deadline.get()
        if deadline is None:
            return True
        return asyncio.get_running_loop().time() + pause + self.attempt_timeout <= deadline


class BoundedScript(AsyncScript):
    """A registered script whose call (EVALSHA, and SCRIPT LOAD and EVALSHA again after
    ``NOSCRIPT``) is one bounded call.

    On a Redis Cluster, ``NOSCRIPT`` (a node that never ran the script: a promoted replica, a
    restarted or new node) is followed by ``EVAL`` with the script's text, routed by the keys
    to that node alone, which caches it too. redis-py's ``SCRIPT LOAD`` goes to every master:
    one hung master failed the calls of every other shard's keys until the bound."""

    async def __call__(self, keys=None, args=None, client=None):
        bound = getattr(self.registered_client, "call_timeout", None)
        target = self.registered_client if client is None else client
        if isinstance(target, redis.asyncio.cluster.RedisCluster):
            return await within(bound, self._on_its_node(target, keys or [], args or []))
        return await within(bound, super().__call__(keys, args, client))

    async def _on_its_node(self, client: Any, keys: Any, args: Any) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.execute_command("EVAL", self.script, len(keys), *keys, *args)


class BoundedPipeline(redis.asyncio.client.Pipeline):
    """A pipeline whose ``execute`` is one bounded call."""

    call_timeout: float | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await within(self.call_timeout, super().execute(raise_on_error))


class BoundedRedis(redis.asyncio.Redis):
    """A standalone client whose every call ends within ``call_timeout`` seconds (see the
    module's docstring); build it with :func:`redisconn.async_client`."""

    call_timeout: float | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await within(self.call_timeout, super().execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> BoundedPipeline:
        # What redis.asyncio.Redis.pipeline builds, with the bounded execute.
        pipe = BoundedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.call_timeout = self.call_timeout
        return pipe

    def register_script(self, script: Any) -> BoundedScript:
        return BoundedScript(self, script)


class BoundedClusterPipeline(redis.asyncio.cluster.ClusterPipeline):
    """A cluster pipeline whose ``execute`` is one bounded call."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True):
        bound = getattr(self.cluster_client, "call_timeout", None)
        return await within(bound, super().execute(raise_on_error, allow_redirections))


class BoundedRedisCluster(redis.asyncio.cluster.RedisCluster):
    """A Redis Cluster client whose every call ends within ``call_timeout`` seconds, slot-map
    reloads and redis-py's cluster retries included; build it with
    :func:`redisconn.async_client`."""

    call_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The nodes the client was given (the URL's), asked first for the command table.
        self._seeds = list(self.nodes_manager.startup_nodes)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await within(self.call_timeout, self._initialized_first(*args, **kwargs))

    async def _initialized_first(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py picks a command's routing policy from the command table before it loads
        # the slot map and that table: a new client's first call found an empty table, took
        # EVALSHA (the publisher's, the gateway's reads) for a keyless command and sent it to
        # a random master, a hung one as well (the call then failed for a healthy shard).
        if getattr(self, "_initialize", False):
            await self.initialize()
        return await super().execute_command(*args, **kwargs)

    async def _refresh_topology(self, *args: Any, **kwargs: Any) -> None:
        """redis-py's, with the command table (``COMMAND``, read once) read from a node that
        answers. redis-py reads it from its default node, the master of slot 0: with that
        master hung, a client started then failed every call, for every shard, for as long as
        it hung (each call loading the slot map again, and asking the hung node again). Here
        the seeds (the URL's node, which usually just answered ``CLUSTER SLOTS``) come first,
        then every other master, the default node last; each is asked in turn."""
        if self.commands_parser.commands:
            return await super()._refresh_topology(*args, **kwargs)
        manager = self.nodes_manager
        await manager.initialize(*args, **kwargs)
        default = manager.default_node
        masters = self.get_primaries()
        candidates = [
            manager.nodes_cache[name] for name in self._seeds if name in manager.nodes_cache
        ]
        candidates += [node for node in masters if node not in candidates and node is not default]
        candidates += [node for node in (default,) if node is not None and node not in candidates]
        error: BaseException | None = None
        for node in candidates:
            try:
                await self.commands_parser.initialize(node)
                return
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                OSError,
            ) as exc:
                error = exc
        if error is not None:
            raise error
        await self.commands_parser.initialize(default)

    async def initialize(self, *args: Any, **kwargs: Any) -> Any:
        # Loading the slot map: inside a call, or on its own (entering a pipeline's context).
        return await within(self.call_timeout, super().initialize(*args, **kwargs))

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises, as redis-py does
        return BoundedClusterPipeline(self, transaction)

    def register_script(self, script: Any) -> BoundedScript:
        return BoundedScript(self, script)
