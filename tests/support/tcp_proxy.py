"""A TCP proxy that can freeze: a server that hangs with its sockets open, for a server the tests
cannot stop themselves (the machine's shared PostgreSQL).

While frozen, the proxy accepts connections and reads what clients send, but forwards nothing in
either direction: to a client it looks exactly like a server stopped with ``SIGSTOP`` (the kernel
accepts and acknowledges, nothing answers). ``thaw()`` forwards what was held, in order.

``wait_held(contains)`` waits until the proxy holds a client's bytes containing ``contains``: a
test then knows its request reached the frozen server and waits there, instead of sleeping and
hoping it did (on a loaded machine the request may still be on its way after any sleep).
"""

from __future__ import annotations

import contextlib
import socket
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
