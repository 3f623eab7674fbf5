"""TCP proxies for fault tests.

``CuttingProxy`` (below) resets the connections open at a given moment, for a client that must
survive abrupt drops. ``FreezableProxy`` can freeze: a server that hangs with its sockets open,
for a server the tests cannot stop themselves (the machine's shared PostgreSQL).

While frozen, the proxy accepts connections and reads what clients send, but forwards nothing in
either direction: to a client it looks exactly like a server stopped with ``SIGSTOP`` (the kernel
accepts and acknowledges, nothing answers). ``thaw()`` forwards what was held, in order.

``wait_held(contains)`` waits until the proxy holds a client's bytes containing ``contains``: a
test then knows its request reached the frozen server and waits there, instead of sleeping and
hoping it did (on a loaded machine the request may still be on its way after any sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading

from tests.support.redis_server import free_port


class FreezableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._running = threading.Event()
        self._running.set()  # set: forwarding; clear: frozen
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._gates: list[threading.Event] = []  # one per connection: cleared, frozen
        self._clients: set[socket.socket] = set()  # the client side of each connection
        #: Connections accepted so far (a client's connects, frozen or not).
        self.accepted = 0
        self._held = bytearray()  # what clients sent while frozen (all connections, in order)
        self._held_changed = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._running.clear()

    def freeze_existing(self) -> None:
        """Freeze the connections open now and forward the ones made later: a server that hung
        while its address moved on (a failover to another host behind the same name)."""
        for gate in list(self._gates):
            gate.clear()

    def thaw(self) -> None:
        self._running.set()

    def wait_held(self, contains: bytes = b"", timeout: float = 10.0) -> None:
        """Block until what clients sent while frozen contains ``contains`` (with ``b""``: any
        byte); ``TimeoutError`` after ``timeout`` seconds. An async test runs it in a thread.
        Only connections made before the freeze count: one made while frozen is not read from
        until the thaw (its bytes wait in the kernel, as on a stopped server)."""
        with self._held_changed:
            if not self._held_changed.wait_for(
                lambda: contains in self._held and bool(self._held), timeout
            ):
                raise TimeoutError(f"the proxy holds no {contains!r} after {timeout} s")

    def close(self) -> None:
        self._closed = True
        self._running.set()
        for gate in self._gates:
            gate.set()
        for sock in [self._listener, *self._sockets]:
            # shutdown() first: close() alone does not end a recv() another thread is blocked
            # in, and while one is, the connection stays open (no FIN): a PostgreSQL session
            # behind the proxy would outlive the test.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._sockets.append(client)
        self._clients.add(client)
        self._running.wait()  # a connection made while frozen waits, as on a stopped server
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        gate = threading.Event()
        gate.set()
        self._gates.append(gate)
        threading.Thread(target=self._pump, args=(client, upstream, gate), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, gate), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, gate: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if source in self._clients and not (self._running.is_set() and gate.is_set()):
                    with self._held_changed:
                        self._held += data
                        self._held_changed.notify_all()
                self._running.wait()
                gate.wait()
                if self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class CuttingProxy:
    """A TCP proxy whose connections a test can cut: ``cut()`` resets every connection open now
    (``SO_LINGER`` 0, so the client gets an RST, not a FIN: the abrupt loss of a connection a
    WebSocket client sees as 1006), while new connections keep being forwarded. The target may
    be down for a while (a gateway restarting on the same port): a connection made then is
    closed at once, as a refused connect would be.

    One asyncio loop in a thread of its own; ``cut()`` waits until the resets are done.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        #: Connections accepted so far, and of those the ones forwarded to the target.
        self.accepted = 0
        self.forwarded = 0
        #: Bytes sent to clients so far (all connections).
        self.downstream_bytes = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._frozen: set[asyncio.StreamWriter] = set()  # the client sides of frozen pairs
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        self.accepted += 1
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            return
        self.forwarded += 1
        pair = (client_w, upstream_w)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_r, upstream_w, downstream=False, client=client_w),
                self._pump(upstream_r, client_w, downstream=True, client=client_w),
            )
        finally:
            self._pairs.discard(pair)
            self._frozen.discard(client_w)

    async def _pump(self, reader, writer, *, downstream: bool, client) -> None:
        try:
            while data := await reader.read(65536):
                if client in self._frozen:
                    continue  # a half-open connection: what is sent is never delivered
                if downstream:
                    self.downstream_bytes += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            _reset(writer)

    def cut(self) -> int:
        """Reset every connection open now; returns how many there were."""

        async def cut() -> int:
            pairs = list(self._pairs)
            for client_w, upstream_w in pairs:
                _reset(client_w)
                _reset(upstream_w)
            return len(pairs)

        return self._call(cut())

    def freeze(self) -> int:
        """Stop forwarding anything of the connections open now, in either direction, without
        closing them (connections made later are forwarded): a half-open connection, as after a
        laptop's sleep or a NAT's timeout. Returns how many there were; ``cut()`` ends them."""

        async def freeze() -> int:
            pairs = list(self._pairs)
            self._frozen.update(client_w for client_w, _ in pairs)
            return len(pairs)

        return self._call(freeze())

    def close(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for client_w, upstream_w in list(self._pairs):
                _reset(client_w)
                _reset(upstream_w)

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST (nothing buffered is sent)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
