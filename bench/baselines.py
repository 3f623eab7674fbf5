"""The baselines the gateway is benchmarked against, fed from the same Redis channels.

* ``naive``: the design in the contract (``websocket_broadcasts.py``): a ``ConnectionManager``
  holding each project's connections and looping ``await ws.send(json.dumps(event))`` over them.
  As such code does, it decodes each event's JSON once and re-encodes it per client.
* ``broadcast``: websockets' own :func:`websockets.asyncio.server.broadcast`: the frame is decoded
  to ``str`` once and broadcast to the project's connections.
* ``floor``: not a design anyone would ship but a reference for the latency figure: each event's
  frame is built once and written with one ``send()`` system call per subscriber, straight to
  the socket (no queue, no limit, no check). Every WebSocket server makes at least that system
  call per delivery, so its publish-to-receive latency is what this machine's kernel allows.

All three use websockets' defaults (as an application would) for the handshake and what clients
send, subscribe to every project channel with one ``PSUBSCRIBE``, and speak just enough of the
gateway's protocol for the load generator:
``subscribe`` / ``unsubscribe`` by project id, answered by ``subscribed`` / ``unsubscribed``.
None has history, replay, gap repair or backpressure.

Run: ``python -m bench.baselines {naive,broadcast,floor} --port P --redis-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections import defaultdict

import redis.asyncio
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from schemas.keys import DEFAULT_PREFIX, Keys


class ConnectionManager:
    """The contract's connection manager: project id -> connections."""

    def __init__(self) -> None:
        self.active_connections: dict[int, list[ServerConnection]] = defaultdict(list)

    def connect(self, websocket: ServerConnection, project_id: int) -> None:
        self.active_connections[project_id].append(websocket)

    def disconnect(self, websocket: ServerConnection, project_id: int) -> None:
        connections = self.active_connections.get(project_id)
        if connections and websocket in connections:
            connections.remove(websocket)

    async def broadcast(self, message: dict, project_id: int) -> None:
        for connection in list(self.active_connections.get(project_id, ())):
            try:
                await connection.send(json.dumps(message))
            except ConnectionClosed:
                self.disconnect(connection, project_id)


class Baseline:
    def __init__(self, kind: str, redis_url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.keys = Keys(prefix)
        self.manager = ConnectionManager()
        # broadcast(): project id -> set of connections
        self.subscribers: dict[int, set[ServerConnection]] = defaultdict(set)
        # floor: project id -> connection -> its socket's file descriptor, in subscription order
        self.descriptors: dict[int, dict[ServerConnection, int]] = defaultdict(dict)

    def join(self, ws: ServerConnection, project_id: int) -> None:
        if self.kind == "naive":
            self.manager.connect(ws, project_id)
        elif self.kind == "floor":
            self.descriptors[project_id][ws] = ws.transport.get_extra_info("socket").fileno()
        else:
            self.subscribers[project_id].add(ws)

    def leave(self, ws: ServerConnection, project_id: int) -> None:
        if self.kind == "naive":
            self.manager.disconnect(ws, project_id)
        elif self.kind == "floor":
            self.descriptors[project_id].pop(ws, None)
        else:
            self.subscribers[project_id].discard(ws)

    async def handler(self, ws: ServerConnection) -> None:
        projects: set[int] = set()
        try:
            async for raw in ws:
                message = json.loads(raw)
                project_id = int(message.get("project_id", 0))
                if message.get("type") == "subscribe" and project_id not in projects:
                    projects.add(project_id)
                    self.join(ws, project_id)
                    await ws.send(f'{{"type":"subscribed","project_id":{project_id}}}')
                elif message.get("type") == "unsubscribe" and project_id in projects:
                    projects.discard(project_id)
                    self.leave(ws, project_id)
                    await ws.send(f'{{"type":"unsubscribed","project_id":{project_id}}}')
        except ConnectionClosed:
            pass
        finally:
            for project_id in projects:
                self.leave(ws, project_id)

    async def relay(self) -> None:
        client = redis.asyncio.Redis.from_url(self.redis_url)
        pubsub = client.pubsub()
        await pubsub.psubscribe(self.keys.channel(0).replace("{0}", "{*}"))
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            _epoch, _seq, _ms, frame = message["data"].split(b"|", 3)
            if self.kind == "naive":
                event = json.loads(frame)
                await self.manager.broadcast(event, project_id=event["project_id"])
            elif self.kind == "floor":
                project_id = self.keys.project_of_channel(message["channel"])
                descriptors = self.descriptors.get(project_id)
                if descriptors:
                    send_all(descriptors, text_frame(frame))
            else:
                project_id = self.keys.project_of_channel(message["channel"])
                connections = self.subscribers.get(project_id)
                if connections:
                    broadcast(connections, frame.decode())


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def send_all(descriptors: dict[ServerConnection, int], frame: bytes) -> None:
    """One ``send()`` of the same bytes per connection, straight to its socket: the least any
    relay does per delivery. A frame the kernel does not take whole (it never happens at this
    benchmark's rates) would corrupt that connection's stream: the client is then dropped."""
    write = os.write
    size = len(frame)
    short = []
    for ws, fd in descriptors.items():
        try:
            if write(fd, frame) != size:
                short.append(ws)
        except OSError:
            short.append(ws)
    for ws in short:
        ws.transport.abort()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    parser.add_argument("kind", choices=["naive", "broadcast", "floor"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    baseline = Baseline(args.kind, args.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = asyncio.create_task(baseline.relay())
    async with serve(baseline.handler, args.host, args.port, backlog=args.backlog):
        await stop.wait()
    relay.cancel()


if __name__ == "__main__":
    asyncio.run(main())
