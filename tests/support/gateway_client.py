"""A recording WebSocket client for gateway tests: it keeps every frame it receives, per project
cursors, and lets a test await a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

CONTROL_TYPES = {
    "authenticated",
    "subscribed",
    "unsubscribed",
    "resync_required",
    "error",
    "pong",
    "presence",
    "presence_diff",
}


class RecordingClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        headers: dict | None = None,
        compression: str | None = "deflate",  # offered; used only if the gateway enables it
    ) -> None:
        self.url = url
        self.token = token
        self.headers = headers or {}
        self.compression = compression
        self.ws: ClientConnection | None = None
        self.messages: list[dict[str, Any]] = []
        #: The text of each message, as received (what a client computes a tag from).
        self.texts: list[str] = []
        self.events: dict[int, list[int]] = defaultdict(list)  # project -> seqs received
        self.epochs: dict[int, str] = {}
        self.closed: asyncio.Event = asyncio.Event()
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def connect(self, *, auth: bool = True) -> RecordingClient:
        self.closed.clear()
        self.close_code = None
        self.ws = await connect(
            self.url,
            additional_headers=self.headers,
            max_size=2**22,
            compression=self.compression,
        )
        self._reader = asyncio.create_task(self._read(self.ws))
        if auth and self.token is not None:
            await self.send({"type": "auth", "token": self.token})
            await self.wait_for(lambda: self.last("authenticated") is not None)
        return self

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                self.messages.append(message)
                self.texts.append(raw if isinstance(raw, str) else raw.decode())
                kind = message.get("type")
                if kind == "subscribed" or kind == "resync_required":
                    self.epochs[message["project_id"]] = message["epoch"]
                    if kind == "resync_required":
                        # The application reloads its state; numbering restarts after seq.
                        self.events[message["project_id"]].append(-message["seq"] - 1)
                elif kind not in CONTROL_TYPES:
                    self.events[message["project_id"]].append(message["seq"])
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.closed.set()
            self._changed.set()

    async def send(self, message: dict | str | bytes) -> None:
        assert self.ws is not None
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.ws.send(message)

    async def subscribe(self, project_id: int, *, resume: bool = False, **extra) -> dict:
        """Subscribe (with this client's cursor when ``resume``) and wait for ``subscribed``."""
        count = self.count("subscribed", project_id)
        message: dict[str, Any] = {"type": "subscribe", "project_id": project_id, **extra}
        if resume:
            epoch, seq = self.cursor(project_id)
            message.update(epoch=epoch, after=seq)
        await self.send(message)
        await self.wait_for(lambda: self.count("subscribed", project_id) > count)
        return [m for m in self.of("subscribed") if m["project_id"] == project_id][-1]

    def cursor(self, project_id: int) -> tuple[str, int]:
        """(epoch, last seq) of the project, as a real client keeps it."""
        last = 0
        for message in self.messages:
            if message.get("project_id") != project_id:
                continue
            kind = message["type"]
            if kind in ("subscribed", "resync_required"):
                last = max(last, message["seq"]) if kind == "subscribed" else message["seq"]
            elif kind not in CONTROL_TYPES:
                last = message["seq"]
        return self.epochs[project_id], last

    def seqs(self, project_id: int) -> list[int]:
        return [s for s in self.events[project_id] if s >= 0]

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    def last(self, kind: str) -> dict | None:
        found = self.of(kind)
        return found[-1] if found else None

    def count(self, kind: str, project_id: int | None = None) -> int:
        return sum(
            1 for m in self.of(kind) if project_id is None or m.get("project_id") == project_id
        )

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every received frame."""
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                if predicate():
                    return
                await self._changed.wait()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --- helpers shared by the gateway tests -----------------------------------------------------

#: The metrics issue 3 names; /metrics must export them and docs/operations.md document them.
REQUIRED_METRICS = (
    "eventbus_connections",
    "eventbus_subscriptions",
    "eventbus_events_in_total",
    "eventbus_deliveries_total",
    "eventbus_replayed_total",
    "eventbus_resyncs_total",
    "eventbus_slow_consumer_disconnects_total",
    "eventbus_pubsub_reconnects_total",
    "eventbus_gaps_repaired_total",
    "eventbus_relay_lag_seconds",
)

SECRET = "gateway-test-secret-0123456789abcdef"


def event(project_id: int, n: int = 1):
    from schemas.events import BlockerResolved, utc_now

    return BlockerResolved(project_id=project_id, blocker_id=n, answer="ok", resolved_at=utc_now())


def served_transport(obj: object, port: int) -> bool:
    """Whether ``obj`` is a server-side asyncio transport of a gateway listening on ``port`` (a
    test's own client transports have it as their peer's port, not their own)."""
    if not issubclass(type(obj), asyncio.BaseTransport):  # (no isinstance: obj may be a proxy)
        return False
    sockname = obj.get_extra_info("sockname")
    return isinstance(sockname, tuple) and sockname[1] == port


async def start_gateway(redis_url: str, **overrides):
    """A started in-process gateway on a free port, Redis at ``redis_url``: authentication by
    :data:`SECRET` and a 2 s drain unless ``overrides`` (GatewayConfig fields) say otherwise. The
    caller drains it."""
    from gateway.config import GatewayConfig
    from gateway.server import Gateway

    settings = {"redis_url": redis_url, "port": 0, "auth_secret": SECRET, "drain_timeout": 2}
    gateway = Gateway(GatewayConfig(**{**settings, **overrides}))
    await gateway.start()
    return gateway


def ws_url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/"


async def client_for(gateway, projects="*", **kwargs) -> RecordingClient:
    """A connected, authenticated client of an in-process gateway."""
    from publisher import issue_token

    token = issue_token(SECRET, projects, ttl=300)
    return await RecordingClient(ws_url(gateway), token=token, **kwargs).connect()


async def publish(publisher, project_id: int, count: int) -> None:
    await publisher.publish_many(event(project_id, n + 1) for n in range(count))


async def publish_until_unsent(gateway, publisher, project_id: int, transport) -> None:
    """Publish one event of ``project_id`` at a time, each awaited until the in-process
    ``gateway`` delivered it, until ``transport`` (a session's, whose client reads nothing) holds
    bytes it could not send: a few hundred, far under asyncio's write-buffer marks. Give the
    client a small receive buffer and the gateway's listeners a small send buffer, or the
    kernel's buffers take thousands of events first."""
    from schemas.events import BlockerResolved, utc_now

    async with asyncio.timeout(20):
        for n in itertools.count(1):
            if transport.get_write_buffer_size():
                return
            published = gateway.metrics.deliveries_total + 1
            await publisher.publish_many(
                [
                    BlockerResolved(
                        project_id=project_id, blocker_id=n, answer="x" * 200, resolved_at=utc_now()
                    )
                ]
            )
            while gateway.metrics.deliveries_total < published:  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.005)


# --- a raw WebSocket client, for clients that read slowly or not at all ----------------------


class RawClient:
    """A WebSocket client over bare asyncio streams with a chosen receive buffer, so a test can
    make it read slowly, or stop reading, which websockets' client does not allow."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int) -> RawClient:
        import base64
        import os
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer)

    async def send(self, message: dict) -> None:
        import os

        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if len(payload) < 126:
            header = bytes([0x81, 0x80 | len(payload)])
        else:
            header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes]:
        """One frame: (opcode, payload)."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def hold_reads(gateway, monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold an in-process gateway's history reads (``store.snapshot``): the first event is set
    when a read starts, which waits until the second is set, then reads."""
    reading, release = asyncio.Event(), asyncio.Event()
    read = gateway.store.snapshot

    async def held(*args, **kwargs):
        reading.set()
        await release.wait()
        return await read(*args, **kwargs)

    monkeypatch.setattr(gateway.store, "snapshot", held)
    return reading, release
