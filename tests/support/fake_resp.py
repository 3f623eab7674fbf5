"""A RESP server that misbehaves on purpose: a buggy Redis-compatible server, a hostile proxy.

``FakeResp(upstream, answer)`` listens on a free port (``unix=True``: on a Unix socket in a
temporary directory of its own, ``url`` a ``unix://`` one), in an asyncio loop of its own thread
(so synchronous clients can use it too); the upstream is a TCP address either way. Each command
a client sends is handed to ``answer(command)`` (the command's arguments as ``bytes``); what it
returns decides the reply:

* ``PROXY``: forward the command to the upstream Redis (one upstream connection per client
  connection) and send its reply back unchanged;
* ``bytes``: send these bytes instead (any RESP, well-formed or not);
* ``Rewrite(change)``: forward it, and send ``change(reply)`` instead of the upstream's reply
  (an extra reply before it, say: the replies of the connection are out of step from then on);
* an ``async`` function ``(reader, writer) -> None``: do anything with the client's connection
  (trickle bytes, close it half-way); it owns the connection from then on.

``answer`` may be replaced at any time (``fake.answer = ...``): "the real Redis is back" is
``fake.answer = proxy``. ``commands`` records every command received, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from tests.support.redis_server import free_port

PROXY = object()


class Rewrite(NamedTuple):
    change: Callable[[bytes], bytes]


Answer = Callable[[list[bytes]], object]


def proxy(command: list[bytes]) -> object:
    return PROXY


class FakeResp:
    def __init__(
        self, upstream: tuple[str, int], answer: Answer = proxy, *, unix: bool = False
    ) -> None:
        self.upstream = upstream
        self.answer = answer
        self.port: int | None = None
        #: The socket's directory (unix=True): short, under the system's temporary directory,
        #: as a socket's path has a limit of about 100 bytes.
        self._directory: str | None = None
        if unix:
            self._directory = tempfile.mkdtemp(prefix="fake-resp-")
            path = os.path.join(self._directory, "redis.sock")
            self.url = f"unix://{path}"
            listen = asyncio.start_unix_server(self._handle, path)
        else:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}"
            listen = asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.commands: list[list[bytes]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self.call(listen)

    def call(self, coro: Awaitable, timeout: float = 10.0):
        """Run ``coro`` in the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def forward(self, command: list[bytes]) -> bytes:
        """The upstream's reply to ``command``, on a connection of its own (for an answer that
        lets a command through and then spoils its reply)."""
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(encode_command(command))
            await writer.drain()
            return await read_reply(reader)
        finally:
            writer.transport.abort()

    def names(self) -> list[bytes]:
        """The names of the commands received so far, upper case."""
        return [command[0].upper() for command in self.commands]

    def drop_all(self) -> None:
        """Close every client connection open now."""

        async def drop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        self.call(drop())

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> FakeResp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._handlers.add(asyncio.current_task())
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                command = await read_command(reader)
                self.commands.append(command)
                decision = self.answer(command)
                if decision is PROXY or isinstance(decision, Rewrite):
                    if upstream is None:
                        upstream = await asyncio.open_connection(*self.upstream)
                    upstream[1].write(encode_command(command))
                    await upstream[1].drain()
                    reply = await read_reply(upstream[0])
                    writer.write(decision.change(reply) if decision is not PROXY else reply)
                elif isinstance(decision, bytes):
                    writer.write(decision)
                else:
                    await decision(reader, writer)
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            pass  # (cancelled: by close())
        finally:
            self._handlers.discard(asyncio.current_task())
            self._writers.discard(writer)
            writer.transport.abort()
            if upstream is not None:
                upstream[1].transport.abort()


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    line = await reader.readuntil(b"\r\n")
    if not line.startswith(b"*"):
        return line.split()  # an inline command
    args = []
    for _ in range(int(line[1:-2])):
        size = int((await reader.readuntil(b"\r\n"))[1:-2])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


def encode_command(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The raw bytes of one complete RESP2/RESP3 reply."""
    line = await reader.readuntil(b"\r\n")
    kind, size = line[:1], line[1:-2]
    if kind in b"$=!" and int(size) >= 0:
        return line + await reader.readexactly(int(size) + 2)
    if kind in b"*~>" and int(size) > 0:
        return line + b"".join([await read_reply(reader) for _ in range(int(size))])
    if kind == b"%" and int(size) > 0:
        return line + b"".join([await read_reply(reader) for _ in range(2 * int(size))])
    if kind == b"|":  # attributes, then the reply they describe
        parts = [await read_reply(reader) for _ in range(2 * int(size) + 1)]
        return line + b"".join(parts)
    return line


def trickle(
    data: bytes, interval: float = 1.0
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable]:
    """An answer that sends ``data`` one byte every ``interval`` seconds, then keeps the
    connection open until the client closes it."""

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)
        await _until_closed(reader)

    return send


def then_close(data: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable]:
    """An answer that sends ``data`` (half a reply, say) and closes the connection."""

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    return send


async def _until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass  # what the client sends meanwhile is never answered
