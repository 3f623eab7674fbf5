"""Sharded pub/sub on Redis Cluster: one :class:`~gateway.pubsub.PubSubLink` per master.

Sharded pub/sub delivers a channel's messages only on the shard that owns the channel's slot,
so a pod needs one subscribed connection per master, each carrying the channels of its slots.
Slots move (resharding) and masters change (failover); both must be followed without losing
anything. Redis tells us in two ways: a master that loses a slot pushes ``sunsubscribe`` for
every channel of it, and a node asked for a channel it does not serve answers ``MOVED``. A
failover shows up as a dead connection. Whenever a channel was unsubscribed for a while, the
hub catches its project up from the stream once the channel is subscribed again.

:class:`SlotMap` is pure (tested without Redis); :class:`ShardLink` is one master's link and
:class:`ClusterPubSub` places channels on them and follows the cluster's changes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import re
from collections.abc import Callable, Iterator
from urllib.parse import SplitResult, urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from gateway.logs import describe, get_logger
from gateway.metrics import Metrics
from gateway.pubsub import MAX_DOUBLINGS, PubSubLink
from gateway.tasks import spawn

__all__ = ["ClusterPubSub", "ShardLink", "SlotMap", "channel_slot"]

log = get_logger("gateway.pubsub")

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
    def from_cluster_slots(cls, reply: object, queried_host: str) -> SlotMap:
        """Parse a ``CLUSTER SLOTS`` reply; an empty or ``?`` host means the queried node's.

        A reply no Redis sends (a broken proxy, a server that is not Redis) raises
        ``redis.exceptions.InvalidResponse``, as a node that does not answer: the caller asks
        another one, or again later."""
        if not isinstance(reply, list):
            raise _bad_slots(reply, "not an array")
        ranges = []
        for entry in reply:
            if not (
                isinstance(entry, list)
                and len(entry) >= 3
                and isinstance(entry[2], list)
                and len(entry[2]) >= 2
            ):
                raise _bad_slots(entry, "not a slot range with its master")
            start, end, (host, port) = entry[0], entry[1], entry[2][:2]
            if not (
                _is_int(start) and _is_int(end) and 0 <= start <= end < 16384 and _is_int(port)
            ):
                raise _bad_slots(entry, "slots or port not numbers")
            if not (0 <= port <= 65535) or not isinstance(host, bytes | str):
                raise _bad_slots(entry, "not a node address")
            host = host.decode("ascii", "replace") if isinstance(host, bytes) else host
            if host in ("", "?"):
                host = queried_host
            elif not _HOST.fullmatch(host):
                raise _bad_slots(entry, "not a host name or address")
            ranges.append((start, end, (host, port)))
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


#: A host name, an IPv4 or an IPv6 address: what goes into a node's URL (nothing that would
#: change its meaning there: ``@``, ``/``, ``?``, ``#``, brackets, spaces).
_HOST = re.compile(r"[A-Za-z0-9._:-]{1,255}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_slots(part: object, problem: str) -> redis.exceptions.InvalidResponse:
    return redis.exceptions.InvalidResponse(
        f"a CLUSTER SLOTS reply no Redis sends ({problem}): {part!r}"[:200]
    )


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
        #: Our own SUNSUBSCRIBEs written on the current connection and not answered yet, per
        #: channel: their answers are not the node's (a channel wanted again meanwhile would
        #: otherwise be taken as interrupted by the node).
        self._leaving: dict[bytes, int] = {}

    @property
    def channels(self) -> list[bytes]:
        return list(self._channels)

    def holds(self, channel: bytes, event: asyncio.Event) -> bool:
        """Whether ``channel`` is subscribed (or being subscribed) here for ``event``."""
        return self._channels.get(channel) is event

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

    async def _write(self, *args: bytes | str) -> None:
        if args[0] == self._unsub and self._conn is not None and self.connected:
            for channel in args[1:]:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1  # type: ignore[index]
        await super()._write(*args)

    def _on_other_reply(self, kind: bytes, reply: list) -> None:
        if kind != b"sunsubscribe":
            return
        channel = reply[1]
        leaving = self._leaving.get(channel)
        if leaving:
            # The answer to our own unsubscribe, whether or not the channel is wanted again.
            if leaving == 1:
                del self._leaving[channel]
            else:
                self._leaving[channel] = leaving - 1
            return
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
        self._leaving.clear()  # their answers died with the connection
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
    def masters(self) -> int:
        """The masters of the slot map last loaded, with the former ones whose links are still
        kept (each holds a connection): 0 before the first map."""
        known = set(self._map.masters) if self._map is not None else set()
        return len(known | set(self._links))

    @property
    def serving(self) -> bool:
        """The slot map is known and a majority of the masters' links is connected: what
        ``/readyz`` asks. Not every link (:attr:`connected`): one master hung or down made every
        pod unready at once, and the load balancer then refused the other shards' projects too;
        a pod cut off from most of the cluster is still unready."""
        links = [
            link
            for address, link in self._links.items()
            if self._map is not None and address in self._map.masters
        ]
        return bool(links) and 2 * sum(link.connected for link in links) > len(links)

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

    async def subscribe(self, channel: bytes) -> bool:
        """Subscribe on the owner of the channel's slot; wait until it confirms: True; False
        when the channel was unsubscribed before that (as :meth:`PubSubLink.subscribe`)."""
        event = self._wanted.get(channel)
        if event is None:
            event = self._wanted[channel] = asyncio.Event()
            async with self._lock:
                if self._wanted.get(channel) is event:
                    await self._place(channel, event)
        await event.wait()
        return self._wanted.get(channel) is event

    async def unsubscribe(self, channel: bytes) -> None:
        """Leave the channel; the subscribes still waiting for it return False."""
        event = self._wanted.pop(channel, None)
        if event is None:
            return
        event.set()  # else its waiters wait forever (see PubSubLink.unsubscribe)
        self._interrupted.discard(channel)
        async with self._lock:
            if channel in self._wanted:
                # Wanted again while we waited for the lock: the route stays, and that
                # subscribe's placement (after us) hands its event to the link. Taking the route
                # away without leaving the channel would leave it on the shard for good should
                # that subscribe be cancelled before its turn.
                return
            link = self._route.pop(channel, None)
            if link is not None:
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
                if not link.holds(channel, event):
                    # Wanted again after an unsubscribe that left it here: the link still has
                    # the old event; subscribing again gets this one confirmed.
                    await link.want(channel, event)
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
                    log.warning("cluster slot map unavailable", error=describe(exc))
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, MAX_DOUBLINGS)))
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
                if reply:
                    return SlotMap.from_cluster_slots(reply, address[0])
            except (redis.exceptions.RedisError, OSError) as exc:
                error = exc
                continue
            finally:
                await client.aclose()
        raise redis.exceptions.ConnectionError(f"no cluster node answered: {error}")


def _netloc(url: SplitResult, address: Address) -> str:
    auth = url.netloc.rpartition("@")[0]
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{auth}@{host}:{address[1]}" if auth else f"{host}:{address[1]}"
