"""The pod's pub/sub link: one Redis connection in subscribed mode, shared by every project.

Channels are subscribed while at least one client of the pod follows the project (the hub keeps
the reference count). The link reconnects by itself with capped exponential backoff, resubscribes
every channel, and then tells the hub, which catches every project up from the streams: messages
published while the link was down are never lost, only late.

A connection can die silently (a half-open TCP connection, a proxy that stopped forwarding) while
every health check stays green; a probe therefore pings *through the subscribed connection* every
``probe_interval`` seconds and forces a reconnect when no pong comes back in time (writing the
ping counts: a Redis that stopped reading holds the write). That also ends a frame sent a byte at
a time, whose reads have no timeout: the pong would come behind it. A connection given up is
dropped at once (:meth:`PubSubLink._drop_socket`). A pong read in the turn of the loop that the
timeout fires in counts: the loop was busy past the timeout, not Redis.

A pong also comes behind every message Redis queued before it: while the pod reads a backlog
(a burst while its loop was busy, a handler slower than Redis sends), the pong may come later
than ``probe_timeout`` on a live link, and a reconnect then would only add load (the catch-up of
every project from the streams) to a pod already behind. So a probe timeout during which whole
frames were read is followed by another, up to :data:`PONG_WINDOWS` (6) in all, 30 s with the
defaults (:class:`PongWait`); after that the link reconnects anyway: a path that forwards
Redis's messages but lost the pod's writes must still be noticed. A frame that has not arrived
whole (one trickled a byte at a time) is no progress. (The presence listener's own pub/sub
connection, used without this link, gives a late pong less room by another rule:
gateway.presence_store._PubSubProbe.)

A frame no Redis sends (a message without data, a channel that is not a string: a broken server
or proxy) is taken as a broken connection too (:func:`frame_problem`): a warning, a reconnect and
the catch-up, never a frame handed on, nor a traceback.

Redis Cluster needs one such link per master: :mod:`gateway.cluster_pubsub` builds that on
:class:`PubSubLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions

from gateway.logs import describe, get_logger
from gateway.metrics import Metrics
from gateway.tasks import spawn

__all__ = [
    "MAX_DOUBLINGS",
    "PONG_WINDOWS",
    "PongWait",
    "PubSubLink",
    "backoff_delays",
    "frame_problem",
]

log = get_logger("gateway.pubsub")


def backoff_delays(base: float = 0.05, cap: float = 2.0) -> itertools.Iterator[float]:
    """Reconnect delays: exponential from ``base`` to ``cap`` with full jitter, forever.

    The exponent stops growing at :data:`MAX_DOUBLINGS`: ``base * 2**attempt`` raised
    OverflowError at the 1,024th attempt (an int too large for a float), out of the task that
    reconnects, after some 17 minutes of a Redis refusing connections."""
    for attempt in itertools.count():
        yield random.uniform(0, min(cap, base * 2 ** min(attempt, MAX_DOUBLINGS)))


#: Doublings of a backoff delay at most: far past any cap (2**60 times the base).
MAX_DOUBLINGS = 60


#: Seconds a connection (TCP connect and handshake) may take before the link gives up on it and
#: tries again on its backoff.
CONNECT_TIMEOUT = 10.0

#: Seconds a link must have been connected with every channel confirmed before its reconnect
#: backoff starts again from the base delay (a flapping link keeps backing off).
HEALTHY_PERIOD = 5.0

#: Probe timeouts a probe waits for its pong in all, while each one read whole frames (a
#: backlog the pong is behind). Bounded: a connection whose pushes still arrive while the pod's
#: writes are lost (a broken proxy) must still be given up, 6 x ``probe_timeout`` after the ping.
PONG_WINDOWS = 6


class PongWait:
    """How many probe timeouts one ping's pong is waited for (pure: counts, no clock).

    ``frames_read`` is the link's count of whole frames read, when the ping goes out and at the
    end of each timeout. The first timeout is always waited; another follows each one during
    which whole frames were read (the connection delivers, and the pong is behind them), up to
    ``limit`` in all. A timeout without a whole frame (a silent connection, or one frame
    trickled a byte at a time) ends the wait.
    """

    def __init__(self, frames_read: int, limit: int = PONG_WINDOWS) -> None:
        self.limit = limit
        #: Timeouts waited so far (the current one included).
        self.windows = 1
        self._frames_read = frames_read

    def another(self, frames_read: int) -> bool:
        """At the end of a timeout without the pong: whether to wait one more (then counted)."""
        progressed = frames_read != self._frames_read
        self._frames_read = frames_read
        if not progressed or self.windows >= self.limit:
            return False
        self.windows += 1
        return True


class PubSubLink:
    """Subscribed-mode connection to one Redis node.

    Args:
        url: Redis URL of the node.
        sharded: use ``SSUBSCRIBE`` / ``smessage`` (Redis >= 7 sharded pub/sub).
        on_message: called with ``(channel, data)`` for every message, in order, synchronously.
        on_resubscribed: called after a reconnect once every channel is subscribed again.
    """

    def __init__(
        self,
        url: str,
        *,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        metrics: Metrics,
        probe_interval: float = 5.0,
        probe_timeout: float = 5.0,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        # RESP2 explicitly: with RESP3 (redis-py's default in 8.x) pub/sub messages are push
        # frames that read_response() hands to a push handler instead of returning them.
        # TCP keepalive for a TCP link only: redis-py's Unix-socket connection refuses the
        # option, and with it every connect of a unix:// link failed (the link never came up).
        keepalive = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
        self._pool = redis.asyncio.ConnectionPool.from_url(
            url, protocol=2, socket_connect_timeout=5, **keepalive
        )
        self._sub, self._unsub = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._message_kind = b"smessage" if sharded else b"message"
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._metrics = metrics
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.connect_timeout = connect_timeout
        #: Channels we want, each with an event set while Redis confirms the subscription.
        self._channels: dict[bytes, asyncio.Event] = {}
        self._conn: redis.asyncio.Connection | None = None
        #: The transport of the current connection's socket (see :meth:`_drop_socket`).
        self._transport: asyncio.BaseTransport | None = None
        self._pong = asyncio.Event()
        #: Whole frames read, every connection together (the probe's sign of progress).
        self.frames_read = 0
        self._task: asyncio.Task | None = None
        self.connected = False
        self._closing = False
        self.connections = 0
        self.healthy_period = HEALTHY_PERIOD
        #: Loop time at which the current connection was confirmed whole (None: not yet).
        self._healthy_since: float | None = None
        #: Reconnect delays used in a row since the link was last healthy (0: next is the base).
        self.backoff_attempts = 0

    @property
    def alive(self) -> bool:
        """Connected, and every wanted channel confirmed."""
        return self.connected and all(event.is_set() for event in self._channels.values())

    @property
    def serving(self) -> bool:
        """Connected: what ``/readyz`` asks (see :attr:`ClusterPubSub.serving`)."""
        return self.connected

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pubsub-link")

    async def close(self) -> None:
        # First: the writes spawned meanwhile (a drain's unsubscribes) find the link closing and
        # write nothing; before, each failed on the connection torn down under it and logged a
        # warning, dozens at every deploy.
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.connected = False  # a write after this must not open a new connection
        self._drop_socket()
        if self._conn:
            await self._conn.disconnect()
        await self._pool.aclose()

    async def subscribe(self, channel: bytes) -> bool:
        """Subscribe and wait until Redis confirms it (callers bound the wait): True; False when
        the channel was unsubscribed before that (no confirmation would ever come for it)."""
        event = self._channels.get(channel)
        if event is None:
            event = self._channels[channel] = asyncio.Event()
            if self.connected:
                await self._send(self._sub, channel)
        await event.wait()
        return self._channels.get(channel) is event

    async def unsubscribe(self, channel: bytes) -> None:
        """Leave the channel; the subscribes still waiting for it return False."""
        event = self._channels.pop(channel, None)
        if event is None:
            return
        # Its waiters would otherwise wait forever, unreachable once their caller dropped them
        # (a hub feed released while its subscribe went on: "Task was destroyed but it is
        # pending!").
        event.set()
        if self.connected:
            await self._send(self._unsub, channel)

    async def _send(self, *args: bytes | str) -> None:
        """Write a command, in a task of its own that the caller's cancellation does not reach.

        Cancelling a write would make redis-py drop the connection, and with it every channel of
        the pod. And the cancellation itself must reach the caller: on Python 3.11, redis-py
        writes through ``asyncio.wait_for``, which returns normally when the write finished as
        the cancellation came, so a cancelled subscribe went on waiting for its confirmation.
        The tasks start in the order of the calls: the commands keep that order on the wire.
        """
        await asyncio.shield(spawn(self._write(*args)))

    async def _write(self, *args: bytes | str) -> None:
        conn = self._conn
        if conn is None or not self._writable(conn):
            return  # the link is down: resubscribing after the reconnect covers the channel
        try:
            await conn.send_command(*args, check_health=False)
        except Exception as exc:
            if self._closing:
                return  # closed under the write (a drain): nothing is owed to this connection
            # The reader notices the broken connection and reconnects; resubscribing then covers
            # this channel too. Not only RedisError/OSError: a connection torn down under the
            # write (the link closing) fails inside redis-py with AttributeError, and nobody
            # awaits a spawned unsubscribe to hear it.
            if conn is not self._conn or self._transport is None:
                return  # the link dropped this connection already: said once, by the reader
            log.warning("pubsub send failed", command=args[0], error=repr(exc))
            self._drop_socket()  # (what wakes the reader)

    def _writable(self, conn: redis.asyncio.Connection) -> bool:
        """Whether ``conn`` is the link's connection, whole: not dropped by the link, nor
        disconnected by redis-py (after a failed write), whose reader has yet to notice.
        redis-py connects a disconnected connection again to write on it: a subscribed
        connection that nobody reads, on a socket the link does not know."""
        return (
            conn is self._conn
            and self.connected
            and not self._closing
            and self._transport is not None
            and conn.is_connected
        )

    async def _run(self) -> None:
        delays = backoff_delays()
        loop = asyncio.get_running_loop()
        while True:
            self._healthy_since = None
            try:
                await self._connect_and_read()
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError, ProbeFailed) as exc:
                log.warning("pubsub link down", error=describe(exc))
            except Exception:
                log.exception("pubsub link failed")
            if self._closing:
                # close() cancelled this task and the cancellation was lost (on Python 3.11,
                # redis-py writes through asyncio.wait_for, which drops one that comes as the
                # write ends): the probe ended the connection (a closing link writes nothing).
                # Reconnecting would repeat that for ever, with close() waiting for this task.
                return
            # _connect_and_read only ends by raising; a connection that was whole for a while
            # was healthy, and its loss starts a fresh backoff (else, after a few early
            # failures, every later reconnect would wait up to the cap for the process's life).
            since = self._healthy_since
            if since is not None and loop.time() - since >= self.healthy_period:
                delays = backoff_delays()
                self.backoff_attempts = 0
            self.connected = False
            self._on_down()
            for event in self._channels.values():
                event.clear()
            self._drop_socket()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.disconnect()
                self._conn = None
            self.backoff_attempts += 1
            await asyncio.sleep(next(delays))

    async def _connect_and_read(self) -> None:
        conn = self._pool.make_connection()
        try:
            # The TCP connect and the handshake after it (CLIENT SETINFO, AUTH, SELECT), whole:
            # a peer that accepts and never answers would otherwise hold the link for as long as
            # redis-py's socket_timeout, which is none by default before redis-py 8.
            async with asyncio.timeout(self.connect_timeout):
                await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        self._conn = conn
        self._transport = conn._writer.transport  # (redis-py's own; see _drop_socket)
        self.connected = True
        self.connections += 1
        reconnected = self.connections > 1
        if reconnected:
            self._metrics.pubsub_reconnects_total += 1
            log.info("pubsub link reconnected", channels=len(self._channels))
        pending = list(self._channels)
        for batch in self._subscribe_batches(pending):
            await conn.send_command(self._sub, *batch, check_health=False)
        probe = asyncio.create_task(self._probe(conn), name="pubsub-probe")
        notified = not reconnected
        loop = asyncio.get_running_loop()
        try:
            if not pending:
                self._healthy_since = loop.time()
                if not notified:
                    self._on_resubscribed()
                    notified = True
            while True:
                # No read timeout: an idle link is normal; the probe detects a dead one.
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=True)
                except redis.exceptions.ResponseError as exc:
                    self.frames_read += 1
                    self._on_error_reply(exc)  # an error answer to a (un)subscribe
                    continue
                except (redis.exceptions.ConnectionError, OSError):
                    if probe.done() and not probe.cancelled() and probe.exception() is not None:
                        probe.result()  # the probe dropped the socket: its reason, not EOF
                    raise
                self.frames_read += 1
                if probe.done():
                    probe.result()  # raises ProbeFailed
                if reply == b"PONG":
                    # Not subscribed to anything (every channel left): Redis is out of subscribed
                    # mode and answers the probe's PING with a plain PONG.
                    self._pong.set()
                    continue
                problem = frame_problem(reply, self._message_kind, self._confirm_kind)
                if problem is not None:
                    # Not Redis, or a broken one (a proxy, a MITM): what else it sent cannot be
                    # trusted either. A lost connection's remedy: reconnect, and the hub catches
                    # every project up from the streams.
                    raise redis.exceptions.InvalidResponse(
                        f"a pub/sub frame no Redis sends ({problem}): {reply!r}"[:200]
                    )
                kind = reply[0]
                if kind == self._message_kind:
                    self._on_message(reply[1], reply[2])
                elif kind == self._confirm_kind:
                    self._confirmed(reply[1])
                    if self._healthy_since is None and self.alive:
                        self._healthy_since = loop.time()
                    if not notified and self.alive:
                        notified = True
                        self._on_resubscribed()
                elif kind == b"pong":
                    self._pong.set()
                else:
                    self._on_other_reply(kind, reply)
        finally:
            probe.cancel()

    # Hooks, overridden by the Redis Cluster shard link (ShardLink below).

    def _subscribe_batches(self, channels: list[bytes]) -> Iterator[list[bytes]]:
        """Arguments of the subscribe commands that resubscribe ``channels`` after a connect."""
        for start in range(0, len(channels), 500):
            yield channels[start : start + 500]

    def _confirmed(self, channel: bytes) -> None:
        event = self._channels.get(channel)
        if event is not None:
            event.set()

    def _on_other_reply(self, kind: bytes, reply: list) -> None:
        """Unsubscribe confirmations and anything else Redis pushes; ignored here."""

    def _on_error_reply(self, exc: redis.exceptions.ResponseError) -> None:
        # A standalone Redis has no reason to refuse a subscribe: treat it as a broken link.
        raise exc

    def _on_down(self) -> None:
        """The connection was lost (the link reconnects by itself)."""

    async def _probe(self, conn: redis.asyncio.Connection) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            if conn is not self._conn:
                return  # a probe that outlived its connection leaves the current one alone
            if not self._writable(conn):
                # Given up meanwhile (redis-py disconnected it after a failed write): no ping
                # (that would connect it again); the socket dropped, if it was not, ends it.
                self._drop_socket()
                return
            self._pong.clear()
            wait = PongWait(self.frames_read)
            written = False
            try:
                while True:
                    try:
                        # The ping's write is inside the first timeout too: a Redis that stopped
                        # reading (hung, its socket's buffers full) holds a write as long as it
                        # holds a pong.
                        async with asyncio.timeout(self.probe_timeout):
                            if not written:
                                await conn.send_command("PING", check_health=False)
                                written = True
                            await self._pong.wait()
                        break
                    except TimeoutError:
                        if self._pong.is_set():
                            # Read in the turn of the loop that the timeout fired in: the loop
                            # was busy past the timeout (a long collection, a blocking call), not
                            # Redis. asyncio runs the reads that were ready before the timers
                            # that were due, so the reader has it by now.
                            break
                        # A write cut short is no backlog (and redis-py dropped its connection);
                        # whole frames read meanwhile are: the pong is behind them (PongWait).
                        if not written or not wait.another(self.frames_read):
                            raise
            except (TimeoutError, redis.exceptions.RedisError) as exc:
                self._metrics.pubsub_probe_failures_total += 1
                # Dropping the socket wakes the reader, which then reconnects.
                if conn is self._conn:
                    self._drop_socket()
                waited = f"{wait.windows} x {self.probe_timeout:g} s"
                raise ProbeFailed(
                    f"no pong on the pub/sub connection within {waited} ({describe(exc)})"
                ) from None

    def _drop_socket(self) -> None:
        """Close the current connection's socket at once, unsent data and all.

        redis-py's ``disconnect`` closes the transport, and asyncio keeps a transport open until
        what it holds is sent: with Redis no longer reading (hung, with its buffers full), the
        socket stayed open, no end of stream reached the reader, and the link waited on it for
        as long as Redis did, probe or no probe (redis-py's own write timeouts "disconnect" the
        same way). An abort ends it now; the reader then reconnects."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()


#: Kinds of the frames Redis sends on a RESP2 subscribed connection whose second element may be
#: nil (an unsubscribe from every channel when subscribed to none).
_NIL_CHANNEL_KINDS = (b"unsubscribe", b"sunsubscribe")


def frame_problem(reply: object, message_kind: bytes, confirm_kind: bytes) -> str | None:
    """What is wrong with a frame read on a RESP2 subscribed connection, or None when Redis
    can have sent it: an array of 2 or 3 (``[kind, channel, data or count]``, ``[pong, data]``),
    its kind and channel bulk strings; a message also has bulk string data, a confirmation a
    count. (A plain ``PONG`` is handled before.)"""
    if not isinstance(reply, list) or not 2 <= len(reply) <= 3:
        return "not an array of 2 or 3"
    kind, channel = reply[0], reply[1]
    if not isinstance(kind, bytes):
        return "its kind is not a string"
    if not isinstance(channel, bytes) and not (channel is None and kind in _NIL_CHANNEL_KINDS):
        return "its channel is not a string"
    if kind == message_kind and not (len(reply) == 3 and isinstance(reply[2], bytes)):
        return "a message without string data"
    if kind == confirm_kind and not (len(reply) == 3 and isinstance(reply[2], int)):
        return "a confirmation without a count"
    return None


class ProbeFailed(Exception):
    """The pub/sub connection did not answer a ping in time."""
