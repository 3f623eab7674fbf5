"""The consumer's WebSocket connect: the gateway's host name is looked up in a daemon thread of
the consumer's own, not in the event loop's default executor (asyncio's ``loop.getaddrinfo``),
every address it gives is tried in order, and TLS still checks the URL's host name."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.server import serve

from consumer import Consumer
from tests.support.tls import localhost_certificate

#: Made-up names this process's ``socket.getaddrinfo`` answers for (see :func:`resolver`).
HUNG = "hung-resolver.test"


class Resolver:
    """``socket.getaddrinfo`` answering for made-up names: each gets the addresses of the IPs
    given, in that order, or (None) waits for a resolver that never answers until the block
    ends (its lookup then fails, as a real one gives up). ``waiting`` is set once a lookup
    waits; ``hung_lookups`` counts the lookups that waited."""

    def __init__(self, names: dict[str, list[str] | None]) -> None:
        self.names = names
        self.waiting = threading.Event()
        self.released = threading.Event()
        self.hung_lookups = 0
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host not in self.names:
            return self._real(host, port, *args, **kwargs)
        addresses = self.names[host]
        if addresses is None:
            self.hung_lookups += 1
            self.waiting.set()
            self.released.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [info for ip in addresses for info in self._real(ip, port, *args, **kwargs)]


@contextlib.contextmanager
def resolver(monkeypatch, names: dict[str, list[str] | None]) -> Iterator[Resolver]:
    fake = Resolver(names)
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    try:
        yield fake
    finally:
        fake.released.set()


async def until_set(event: threading.Event) -> None:
    """Wait for ``event`` without the loop's default executor (which the tests watch)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wait() -> None:
        event.wait()
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=wait, daemon=True).start()
    await done


async def test_a_gateway_whose_host_name_lookup_hangs_is_a_failed_attempt_at_open_timeout(
    monkeypatch,
):
    """A resolver that does not answer: the attempt fails at ``open_timeout`` (0.3 s here) as
    any connection that cannot be made, and the consumer backs off to try again."""
    with resolver(monkeypatch, {HUNG: None}) as names:
        consumer = Consumer(f"ws://{HUNG}:8765/", open_timeout=0.3, random=lambda: 0.5)
        async with asyncio.timeout(10) as bound:
            delay = await consumer._connect_once()
        await consumer.aclose()
        assert not bound.expired() and names.waiting.is_set()
    assert consumer.connects == 0
    assert delay == 0.5  # the backoff's first (random 0.5): a retryable failure


def test_asyncio_run_does_not_wait_for_a_gateways_host_name_lookup(monkeypatch):
    """A program's ``asyncio.run`` waits for the loop's default executor's threads on exit, and
    websockets looked the gateway's name up in one (``loop.getaddrinfo``): a program that
    started a consumer and closed it did not end while the resolver hung (the resolver's own
    timeouts, 30 s and more; here until the test ends)."""

    async def main() -> None:
        async with Consumer(f"ws://{HUNG}:8765/", open_timeout=0.2):
            await until_set(names.waiting)

    with resolver(monkeypatch, {HUNG: None}) as names:
        program = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        program.start()
        program.join(10)
        assert not program.is_alive()


async def test_reconnects_against_a_hung_resolver_leave_the_default_executor_free(monkeypatch):
    """Each attempt's lookup went on in one of the default executor's threads after the attempt
    was given up: once ``min(32, CPUs + 4)`` of them waited on the resolver, every
    ``run_in_executor(None, ...)`` of the program (``asyncio.to_thread``) waited behind them.
    Now the attempts leave the executor alone, and share the one lookup still waiting for the
    name rather than starting a thread each."""
    loop = asyncio.get_running_loop()
    with resolver(monkeypatch, {HUNG: None}) as names:
        consumer = Consumer(f"ws://{HUNG}:8765/", open_timeout=0.05)
        for _ in range(40):  # more than the default executor's threads on any machine
            await consumer._connect_once()
        async with asyncio.timeout(10) as bound:  # (before: until the resolver answers)
            assert await loop.run_in_executor(None, lambda: "ran") == "ran"
        assert not bound.expired()
        assert names.hung_lookups == 1
        await consumer.aclose()


#: The Host headers of the handshakes :func:`_record_host` answered.
hosts: list[str] = []


async def _handshakes(url: str) -> tuple[int, list[str]]:
    """Connect a consumer to ``url`` once: its connections, and the Host headers the server
    saw meanwhile."""
    hosts.clear()
    consumer = Consumer(url, token="t", random=lambda: 0.5)
    await consumer._connect_once()
    await consumer.aclose()
    return consumer.connects, list(hosts)


async def _record_host(connection) -> None:
    hosts.append(connection.request.headers["Host"])
    await connection.recv()  # the token
    await connection.close(1000)


async def test_a_gateway_by_address_or_by_name_connects(monkeypatch):
    """An IP address, ``localhost`` (``::1`` first on many systems, where the server does not
    listen), and a name whose first address refuses: each address is tried in order until one
    connects, and the Host header is the URL's."""
    async with serve(_record_host, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with resolver(monkeypatch, {"two-addresses.test": ["::1", "127.0.0.1"]}):
            for host in ("127.0.0.1", "localhost", "two-addresses.test"):
                assert await _handshakes(f"ws://{host}:{port}/") == (1, [f"{host}:{port}"])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for the name ``localhost`` only (no IP address in it)."""
    return localhost_certificate(tmp_path_factory.mktemp("tls"))


async def test_wss_checks_the_certificate_against_the_urls_host_name(monkeypatch, certificate):
    """The name is looked up apart from the connect; TLS still sends the URL's name (SNI) and
    checks the certificate against it: ``localhost`` passes (a check against the address would
    fail: the certificate names none), another name of the same address is refused."""
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the consumer's default context trusts it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: names.append(name)
    async with serve(_record_host, "127.0.0.1", 0, ssl=context) as server:
        port = server.sockets[0].getsockname()[1]
        assert await _handshakes(f"wss://localhost:{port}/") == (1, [f"localhost:{port}"])
        with resolver(monkeypatch, {"other-name.test": ["127.0.0.1"]}):
            assert await _handshakes(f"wss://other-name.test:{port}/") == (0, [])
    assert names[0] == "localhost" and names[-1] == "other-name.test"


async def test_an_attempt_waiting_for_a_late_lookup_connects_when_it_answers(monkeypatch):
    """Attempts share the lookup of a name still under way: one made while an earlier
    attempt's lookup waits (the attempt given up at ``open_timeout``) connects as soon as the
    resolver answers it."""
    answer = threading.Event()
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "late.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        answer.wait(60)
        return real("127.0.0.1", port, *args, **kwargs)

    import consumer.lookups

    asked = asyncio.Event()
    shared_lookup = consumer.lookups.getaddrinfo

    async def asking(host: str, port: int) -> list:
        asked.set()
        return await shared_lookup(host, port)  # (waits for the lookup under way, if any)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        async with serve(_record_host, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            bus = Consumer(f"ws://late.test:{port}/", token="t", open_timeout=0.2)
            await bus._connect_once()  # given up: the resolver has not answered
            assert bus.connects == 0
            bus._connect_options["open_timeout"] = 10
            monkeypatch.setattr(consumer.lookups, "getaddrinfo", asking)
            second = asyncio.create_task(bus._connect_once())
            await asked.wait()  # the second attempt waits for the name
            answer.set()
            await second
            await bus.aclose()
    finally:
        answer.set()
    assert bus.connects == 1 and lookups == ["late.test"]


class _NoIPv6Socket(socket.socket):
    """A kernel without IPv6 (``ipv6.disable=1``): an IPv6 socket cannot even be made."""

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, type, proto, fileno)


async def test_a_name_whose_first_address_is_of_a_family_the_system_lacks_connects(monkeypatch):
    """On a system without IPv6, ``localhost`` is still ``::1`` first (``/etc/hosts``) but an
    IPv6 socket cannot be made: as ``loop.create_connection`` does, that address is a failed
    one and the next is tried (the attempt failed with EAFNOSUPPORT, and every one after it)."""
    async with serve(_record_host, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with resolver(monkeypatch, {"two-addresses.test": ["::1", "127.0.0.1"]}):
            monkeypatch.setattr(socket, "socket", _NoIPv6Socket)
            url = f"ws://two-addresses.test:{port}/"
            assert await _handshakes(url) == (1, [f"two-addresses.test:{port}"])
