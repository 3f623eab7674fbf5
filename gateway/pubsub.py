"""The pod's pub/sub link: one Redis connection in subscribed mode, shared by every project.

Channels are subscribed while at least one client of the pod follows the project (the hub keeps
the reference count). The link reconnects by itself with capped exponential backoff, resubscribes
every channel, and then tells the hub, which catches every project up from the streams: messages
published while the link was down are never lost, only late.

A connection can die silently (a half-open TCP connection, a proxy that stopped forwarding) while
every health check stays green; a probe therefore pings *through the subscribed connection* every
``probe_interval`` seconds and forces a reconnect when no pong comes back in time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator
from urllib.parse import SplitResult, urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.tasks import spawn

__all__ = ["ClusterPubSub", "PubSubLink", "ShardLink", "SlotMap", "backoff_delays"]

log = get_logger("gateway.pubsub")


def backoff_delays(base: float = 0.05, cap: float = 2.0) -> itertools.Iterator[float]:
    """Reconnect delays: exponential from ``base`` to ``cap`` with full jitter, forever."""
    for attempt in itertools.count():
        yield random.uniform(0, min(cap, base * 2**attempt))


#: Seconds a link must have been connected with every channel confirmed before its reconnect
#: backoff starts again from the base delay (a flapping link keeps backing off).
HEALTHY_PERIOD = 5.0


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
    ) -> None:
        # RESP2 explicitly: with RESP3 (redis-py's default in 8.x) pub/sub messages are push
        # frames that read_response() hands to a push handler instead of returning them.
        self._pool = redis.asyncio.ConnectionPool.from_url(
            url, protocol=2, socket_connect_timeout=5, socket_keepalive=True
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
        #: Channels we want, each with an event set while Redis confirms the subscription.
        self._channels: dict[bytes, asyncio.Event] = {}
        self._conn: redis.asyncio.Connection | None = None
        self._pong = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.connected = False
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

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pubsub-link")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn:
            await self._conn.disconnect()
        await self._pool.aclose()

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe and wait until Redis confirms it (callers bound the wait)."""
        event = self._channels.get(channel)
        if event is None:
            event = self._channels[channel] = asyncio.Event()
            if self.connected:
                await self._send(self._sub, channel)
        await event.wait()

    async def unsubscribe(self, channel: bytes) -> None:
        if self._channels.pop(channel, None) is not None and self.connected:
            await self._send(self._unsub, channel)

    async def _send(self, *args: bytes | str) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.send_command(*args, check_health=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            # The reader notices the broken connection and reconnects; resubscribing then covers
            # this channel too.
            log.warning("pubsub send failed", command=args[0], error=str(exc))

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
                log.warning("pubsub link down", error=str(exc) or type(exc).__name__)
            except Exception:
                log.exception("pubsub link failed")
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
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.disconnect()
                self._conn = None
            self.backoff_attempts += 1
            await asyncio.sleep(next(delays))

    async def _connect_and_read(self) -> None:
        conn = self._pool.make_connection()
        await conn.connect()
        self._conn = conn
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
                    self._on_error_reply(exc)  # an error answer to a (un)subscribe
                    continue
                if probe.done():
                    probe.result()  # raises ProbeFailed
                if reply == b"PONG":
                    # Not subscribed to anything (every channel left): Redis is out of subscribed
                    # mode and answers the probe's PING with a plain PONG.
                    self._pong.set()
                    continue
                if not isinstance(reply, list) or len(reply) < 2:
                    continue
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
            self._pong.clear()
            await conn.send_command("PING", check_health=False)
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self._pong.wait()
            except TimeoutError:
                self._metrics.pubsub_probe_failures_total += 1
                # Breaking the connection wakes the reader, which then reconnects.
                await conn.disconnect()
                raise ProbeFailed("no pong on the pub/sub connection") from None


class ProbeFailed(Exception):
    """The pub/sub connection did not answer a ping in time."""


# --- Redis Cluster ---------------------------------------------------------------------------
#
# Sharded pub/sub delivers a channel's messages only on the shard that owns the channel's slot,
# so a pod needs one subscribed connection per master, each carrying the channels of its slots.
# Slots move (resharding) and masters change (failover); both must be followed without losing
# anything. Redis tells us in two ways: a master that loses a slot pushes ``sunsubscribe`` for
# every channel of it, and a node asked for a channel it does not serve answers ``MOVED``. A
# failover shows up as a dead connection. Whenever a channel was unsubscribed for a while, the
# hub catches its project up from the stream once the channel is subscribed again.

Address = tuple[str, int]

#: Seconds between two slot-map reloads or placement passes, at least.
MIN_REFRESH_GAP = 0.1


class SlotMap:
    """Which master serves which hash slot (pure; built from ``CLUSTER SLOTS``).

    ``MOVED`` answers are applied as per-slot overrides until the next full reload, the way
    cluster clients do: the node that refused knows better than our last snapshot.
    """

    __slots__ = ("_moved", "_ranges", "_starts")

    def __init__(self, ranges: list[tuple[int, int, Address]]) -> None:
        self._ranges = sorted(ranges)
        self._starts = [start for start, _, _ in self._ranges]
        self._moved: dict[int, Address] = {}

    @classmethod
    def from_cluster_slots(cls, reply: list, queried_host: str) -> SlotMap:
        """Parse a ``CLUSTER SLOTS`` reply; an empty or ``?`` host means the queried node's."""
        ranges = []
        for entry in reply:
            host, port = entry[2][0], entry[2][1]
            host = host.decode() if isinstance(host, bytes) else str(host)
            if host in ("", "?"):
                host = queried_host
            ranges.append((int(entry[0]), int(entry[1]), (host, int(port))))
        return cls(ranges)

    def owner(self, slot: int) -> Address | None:
        moved = self._moved.get(slot)
        if moved is not None:
            return moved
        index = bisect.bisect_right(self._starts, slot) - 1
        if index >= 0 and self._ranges[index][1] >= slot:
            return self._ranges[index][2]
        return None

    def moved(self, slot: int, address: Address) -> None:
        self._moved[slot] = address

    @property
    def masters(self) -> set[Address]:
        return {address for _, _, address in self._ranges} | set(self._moved.values())


def channel_slot(channel: bytes) -> int:
    return key_slot(channel)


class ShardLink(PubSubLink):
    """The sharded pub/sub connection to one master of a Redis Cluster.

    Channels are handed in and out by :class:`ClusterPubSub` (``want``/``drop``), which owns the
    per-channel events. Two things a standalone link never sees are handed back to it:

    * ``sunsubscribe`` pushed for a channel still wanted: the slot may have moved away (or it is
      the late answer to our own unsubscribe of a channel wanted again). Either way the link
      simply subscribes again: the node confirms, or refuses with ``MOVED``.
    * ``MOVED`` (to a subscribe or unsubscribe): every channel of that slot is misplaced here;
      they go back to the ClusterPubSub with the new owner's address.
    """

    def __init__(self, address: Address, url: str, *, owner: ClusterPubSub, **kwargs) -> None:
        super().__init__(
            url,
            sharded=True,
            on_message=owner.on_message,
            on_resubscribed=lambda: None,  # ClusterPubSub follows each channel instead
            **kwargs,
        )
        self.address = address
        self._owner = owner

    @property
    def channels(self) -> list[bytes]:
        return list(self._channels)

    async def want(self, channel: bytes, event: asyncio.Event) -> None:
        """Subscribe without waiting; ``event`` is set when the node confirms."""
        self._channels[channel] = event
        if self.connected:
            await self._send(self._sub, channel)

    async def drop(self, channel: bytes) -> None:
        if self._channels.pop(channel, None) is not None and self.connected:
            await self._send(self._unsub, channel)

    def _subscribe_batches(self, channels: list[bytes]) -> Iterator[list[bytes]]:
        # A cluster node refuses a multi-channel SSUBSCRIBE across slots (CROSSSLOT).
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(channel_slot(channel), []).append(channel)
        yield from by_slot.values()

    def _confirmed(self, channel: bytes) -> None:
        if channel in self._channels:
            super()._confirmed(channel)
            self._owner.confirmed(channel)

    def _on_other_reply(self, kind: bytes, reply: list) -> None:
        if kind != b"sunsubscribe":
            return
        channel = reply[1]
        event = self._channels.get(channel)
        if event is None:
            return  # the answer to our own unsubscribe
        event.clear()
        self._owner.interrupted(channel)
        spawn(self._resubscribe(channel))

    async def _resubscribe(self, channel: bytes) -> None:
        if channel in self._channels and self.connected:
            await self._send(self._sub, channel)

    def _on_error_reply(self, exc: redis.exceptions.ResponseError) -> None:
        if not isinstance(exc, redis.exceptions.AskError):  # MovedError is an AskError
            raise exc  # CLUSTERDOWN and the like: reconnect with backoff, then retry
        misplaced = [c for c in self._channels if channel_slot(c) == exc.slot_id]
        for channel in misplaced:
            del self._channels[channel]
        self._owner.redirected(self, misplaced, exc.slot_id, (exc.host, exc.port))

    def _on_down(self) -> None:
        for channel in self._channels:
            self._owner.interrupted(channel)
        self._owner.link_down(self)


class ClusterPubSub:
    """Sharded pub/sub over a whole Redis Cluster, with :class:`PubSubLink`'s interface.

    One :class:`ShardLink` per master (so readiness covers every shard), each channel routed to
    the link of the master that owns its slot. The slot map is reloaded when a link loses its
    connection (a failover looks like that) and every ``refresh_interval`` seconds; ``MOVED``
    answers correct it per slot in between. A channel that was unsubscribed for any length of
    time (slot moved, node failed, link reconnected) is reported through ``on_recovered`` once it
    is subscribed again, so that the hub reads what was published meanwhile from the stream.

    Args:
        url: ``redis+cluster://host:port`` of a seed node (credentials and TLS carry over to
            every node).
        on_message: ``(channel, data)`` for every message, in order per channel.
        on_recovered: channels subscribed again after an interruption.
    """

    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[bytes, bytes], None],
        on_recovered: Callable[[list[bytes]], None],
        metrics: Metrics,
        probe_interval: float = 5.0,
        probe_timeout: float = 5.0,
        refresh_interval: float = 15.0,
    ) -> None:
        parts = urlsplit(url)
        self._url = parts._replace(scheme=parts.scheme.removesuffix("+cluster"))
        self._seeds: list[Address] = [(parts.hostname or "127.0.0.1", parts.port or 6379)]
        self.on_message = on_message
        self._on_recovered = on_recovered
        self._link_options = {
            "metrics": metrics,
            "probe_interval": probe_interval,
            "probe_timeout": probe_timeout,
        }
        self.refresh_interval = refresh_interval
        self._map: SlotMap | None = None
        self._links: dict[Address, ShardLink] = {}
        self._wanted: dict[bytes, asyncio.Event] = {}  # set while confirmed on the owner
        self._route: dict[bytes, ShardLink] = {}
        self._interrupted: set[bytes] = set()
        self._lock = asyncio.Lock()  # one placement change at a time
        self._reload = True
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.map_loads = 0

    # --- the PubSubLink interface ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The slot map is known and every master's link is connected."""
        return (
            self._map is not None
            and bool(self._links)
            and all(link.connected for link in self._links.values())
        )

    @property
    def alive(self) -> bool:
        return self.connected and all(event.is_set() for event in self._wanted.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="cluster-pubsub")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe on the owner of the channel's slot; wait until it confirms."""
        event = self._wanted.get(channel)
        if event is None:
            event = self._wanted[channel] = asyncio.Event()
            async with self._lock:
                if self._wanted.get(channel) is event and channel not in self._route:
                    await self._place(channel, event)
        await event.wait()

    async def unsubscribe(self, channel: bytes) -> None:
        if self._wanted.pop(channel, None) is None:
            return
        self._interrupted.discard(channel)
        async with self._lock:
            link = self._route.pop(channel, None)
            if link is not None and channel not in self._wanted:
                await link.drop(channel)

    # --- called by the shard links ---------------------------------------------------------

    def confirmed(self, channel: bytes) -> None:
        if channel in self._interrupted:
            self._interrupted.discard(channel)
            self._on_recovered([channel])

    def interrupted(self, channel: bytes) -> None:
        if channel in self._wanted:
            self._interrupted.add(channel)

    def redirected(
        self, link: ShardLink, channels: list[bytes], slot: int, address: Address
    ) -> None:
        log.info("pubsub slot moved", slot=slot, to=f"{address[0]}:{address[1]}")
        if self._map is not None:
            self._map.moved(slot, address)
        for channel in channels:
            if self._route.get(channel) is link:
                del self._route[channel]
            self.interrupted(channel)
        self._wake.set()  # place them on the new owner

    def link_down(self, link: ShardLink) -> None:
        self._reload = True  # a failover, or a master removed: look again
        self._wake.set()

    # --- placement ---------------------------------------------------------------------------

    async def _place(self, channel: bytes, event: asyncio.Event) -> bool:
        """Route one wanted channel to its owner's link (caller holds the lock); True when it
        was taken away from another node's link."""
        if self._map is None:
            return False  # placed by _maintain once the map is known
        owner = self._map.owner(channel_slot(channel))
        if owner is None:
            self._reload = True
            self._wake.set()
            return False
        link = self._route.get(channel)
        moved = link is not None
        if link is not None:
            if link.address == owner:
                return False
            del self._route[channel]
            self.interrupted(channel)
            await link.drop(channel)
            if self._wanted.get(channel) is not event:
                return moved
        link = self._link(owner)
        self._route[channel] = link
        await link.want(channel, event)
        return moved

    def _link(self, address: Address) -> ShardLink:
        link = self._links.get(address)
        if link is None:
            url = urlunsplit(self._url._replace(netloc=_netloc(self._url, address)))
            link = self._links[address] = ShardLink(address, url, owner=self, **self._link_options)
            link.start()
        return link

    async def _maintain(self) -> None:
        """Keep the slot map fresh and every wanted channel on its owner's link."""
        failures = 0
        while True:
            self._wake.clear()
            if self._reload or self._map is None:
                try:
                    self._map = await self._load_map()
                except (redis.exceptions.RedisError, OSError) as exc:
                    failures += 1
                    log.warning("cluster slot map unavailable", error=str(exc))
                    await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                    continue
                failures = 0
                self._reload = False
                self.map_loads += 1
            async with self._lock:
                await self._reconcile()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_interval):
                    await self._wake.wait()
            if not self._wake.is_set():
                self._reload = True  # periodic reload: topology changes nobody told us about
            # Coalesce bursts of wake-ups (every link of a failed node reports each retry).
            await asyncio.sleep(MIN_REFRESH_GAP)

    async def _reconcile(self) -> None:
        assert self._map is not None
        masters = self._map.masters
        for address in masters:
            self._link(address)
        moved = 0
        for channel, event in list(self._wanted.items()):
            if self._wanted.get(channel) is event:
                moved += await self._place(channel, event)
        if moved:
            log.info("pubsub channels moved to their new masters", channels=moved)
        for address, link in list(self._links.items()):
            if address not in masters and not link.channels:
                del self._links[address]
                await link.close()
                log.info("pubsub link closed: not a master", node=f"{address[0]}:{address[1]}")

    async def _load_map(self) -> SlotMap:
        """``CLUSTER SLOTS`` from the first node that answers: connected links first, then the
        seeds, then every node of the last map."""
        candidates = [a for a, link in self._links.items() if link.connected]
        candidates += [a for a in self._seeds if a not in candidates]
        candidates += [a for a in self._links if a not in candidates]
        error: Exception | None = None
        for address in candidates:
            url = urlunsplit(self._url._replace(netloc=_netloc(self._url, address)))
            client = redis.asyncio.Redis.from_url(
                url, protocol=2, socket_connect_timeout=1, socket_timeout=2
            )
            try:
                reply = await client.execute_command("CLUSTER", "SLOTS")
            except (redis.exceptions.RedisError, OSError) as exc:
                error = exc
                continue
            finally:
                await client.aclose()
            if reply:
                return SlotMap.from_cluster_slots(reply, address[0])
        raise redis.exceptions.ConnectionError(f"no cluster node answered: {error}")


def _netloc(url: SplitResult, address: Address) -> str:
    auth = url.netloc.rpartition("@")[0]
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{auth}@{host}:{address[1]}" if auth else f"{host}:{address[1]}"
