"""Synchronous connections whose host-name lookup is inside their connect timeout, and whose
replies are each read within the read timeout in all.

redis-py's ``Connection`` looks the host name up with a blocking ``socket.getaddrinfo`` in the
calling thread before its connect timeout applies, and nothing interrupts that: a DNS server that
does not answer held a call for the system resolver's own limit (with glibc, 5 s per try, 2 tries,
for each name server and each search domain) on top of every timeout of the caller.
:class:`ResolvingConnection` (and :class:`ResolvingSSLConnection`) look the name up in a daemon
thread and wait for it at most the connect timeout; the lookup and the TCP connect to the first
address it gives share that timeout, as they do in redis-py's asyncio client. An IP address is
used as it is, without a thread. Everything else is redis-py's: the host name stays the one of the
URL (TLS checks the certificate against it and sends it as SNI), every address the lookup gives
(IPv6 and IPv4) is tried in its order, further addresses each with the full connect timeout.

The same connections also bound a reply as a whole: redis-py's ``socket_timeout`` applies to each
``recv`` of a synchronous connection, so a server (or a proxy) that sent a reply a byte at a time,
each byte within the timeout, held a call for as long as it kept going: a reply announcing a
2 GB bulk string (``$2147483647``) and trickling it held a ``Publisher`` call for ever, whatever
its ``timeout``. :class:`ResolvingConnection` reads each reply within ``socket_timeout`` in all
(:class:`WholeReplyParser`): a reply still incomplete then raises ``redis.exceptions.TimeoutError``
and the connection is dropped, as after a server that sent nothing. (This needs hiredis, a
dependency of the event bus; redis-py's pure-Python parser keeps its per-``recv`` timeout.) A
Unix socket (``unix://``) is read the same way, by :class:`WholeReplyUnixConnection`: both mix in
:class:`WholeReplyReads`, which sets the parser's deadline for each reply.

An asyncio client needs none of this: asyncio looks names up in its default executor, and the
connect timeout (an ``asyncio.timeout`` around the lookup and the connect) stops the wait. The
lookup itself goes on there too, in one of the executor's threads (at most ``min(32, CPUs + 4)``),
until the resolver gives up; while every one of them waits on a hung resolver, other work sent to
that executor (``asyncio.to_thread``) waits behind them. And its connections, TCP and Unix alike,
read each reply under one ``asyncio.timeout`` of the read timeout, not one per ``recv``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import os
import socket
import threading
import time

import redis.connection
import redis.exceptions
from redis._parsers import _HiredisParser
from redis.utils import HIREDIS_AVAILABLE, SENTINEL

__all__ = [
    "MAX_PENDING_LOOKUPS",
    "ResolvingConnection",
    "ResolvingSSLConnection",
    "WholeReplyParser",
    "WholeReplyReads",
    "WholeReplyUnixConnection",
    "resolve",
]

#: Lookups that may still wait for the resolver at once (each holds a thread until the resolver
#: gives up): past that, a new lookup fails at once instead of starting one more thread.
MAX_PENDING_LOOKUPS = 16

_pending = 0
_pending_lock = threading.Lock()


def _forget_pending_in_child() -> None:
    # A forked child has none of its parent's lookup threads: their slots would never come back.
    global _pending, _pending_lock
    _pending, _pending_lock = 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pending_in_child)


def resolve(host: str, port: int, family: int, timeout: float | None) -> list[tuple]:
    """``socket.getaddrinfo(host, port, family, SOCK_STREAM)``, waited for at most ``timeout``
    seconds (None: as long as it takes, in the calling thread).

    Raises ``socket.gaierror`` (``EAI_AGAIN``, "temporary failure in name resolution") when the
    resolver gave no answer in time, or when ``MAX_PENDING_LOOKUPS`` lookups still wait for it;
    redis-py reports either as a ``ConnectionError`` naming the host. The lookup's own errors are
    raised as they are.
    """
    if timeout is None or _is_ip_address(host):  # (an IP address needs no lookup)
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    global _pending
    with _pending_lock:
        if _pending >= MAX_PENDING_LOOKUPS:
            raise socket.gaierror(
                socket.EAI_AGAIN,
                f"{_pending} lookups still wait for the resolver; not looking up {host!r}",
            )
        _pending += 1
    answer: concurrent.futures.Future[list[tuple]] = concurrent.futures.Future()

    def look_up() -> None:
        global _pending
        try:
            answer.set_result(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        except BaseException as exc:
            answer.set_exception(exc)
        finally:
            with _pending_lock:
                _pending -= 1

    # A daemon thread, not an executor: a lookup stuck in the resolver must not hold the
    # process's exit (concurrent.futures joins its workers at exit).
    threading.Thread(target=look_up, name="redisconn-resolve", daemon=True).start()
    try:
        return answer.result(timeout)
    except concurrent.futures.TimeoutError:
        raise socket.gaierror(
            socket.EAI_AGAIN, f"no answer from the resolver for {host!r} within {timeout:g} s"
        ) from None


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class WholeReplyParser(_HiredisParser):
    """redis-py's hiredis parser, reading a reply within one deadline instead of a timeout per
    ``recv``: while :attr:`deadline` (a ``time.monotonic()`` value) is set, each read waits at
    most until then, and a read that would start after it raises ``TimeoutError`` at once.
    :meth:`ResolvingConnection.read_response` sets it for each reply."""

    deadline: float | None = None
    #: The reply's first read is still to come. It waits the socket's own timeout, which ends
    #: by the deadline anyway: a reply that comes in one ``recv`` (nearly every one) costs
    #: nothing more than before, where a wait of its own costs two ``settimeout`` calls.
    first_read = False

    def read_from_socket(self, timeout=SENTINEL, raise_on_timeout=True):
        deadline = self.deadline
        if deadline is None or timeout is not SENTINEL:
            return super().read_from_socket(timeout, raise_on_timeout)  # (a caller's own wait)
        if self.first_read:
            self.first_read = False
            return super().read_from_socket(timeout, raise_on_timeout)
        left = deadline - time.monotonic()
        if left > 0:
            return super().read_from_socket(left, raise_on_timeout)
        if not raise_on_timeout:
            return False
        raise redis.exceptions.TimeoutError("reply still incomplete at the read timeout")


class WholeReplyReads:
    """Mixed in before a redis-py synchronous connection class: each reply is read within
    ``socket_timeout`` in all, not per ``recv`` (:class:`WholeReplyParser`, when the connection
    uses redis-py's default parser, hiredis). A reply still incomplete then raises
    ``redis.exceptions.TimeoutError`` and redis-py drops the connection. What a caller waits for
    with a timeout of its own (a pub/sub ``get_message(timeout=...)``) keeps that timeout."""

    socket_timeout: float | None

    def __init__(self, *args, **kwargs) -> None:
        if HIREDIS_AVAILABLE and kwargs.get("parser_class", _HiredisParser) is _HiredisParser:
            kwargs["parser_class"] = WholeReplyParser  # (redis-py's default parser)
        super().__init__(*args, **kwargs)

    def read_response(self, *args, **kwargs):
        parser = self._parser
        if self.socket_timeout is None or not isinstance(parser, WholeReplyParser):
            return super().read_response(*args, **kwargs)
        parser.deadline = time.monotonic() + self.socket_timeout
        parser.first_read = True
        try:
            return super().read_response(*args, **kwargs)
        finally:
            parser.deadline = None


class ResolvingConnection(WholeReplyReads, redis.connection.Connection):
    """redis-py's TCP connection, with the host-name lookup inside the connect timeout and each
    reply read within ``socket_timeout`` in all (see the module's docstring)."""

    def _connect(self) -> socket.socket:
        # redis-py's Connection._connect, with resolve() for its getaddrinfo.
        started = time.monotonic()
        timeout = self.socket_connect_timeout
        addresses = resolve(self.host, self.port, self.socket_type, timeout)
        error: OSError | None = None
        for index, (family, socktype, proto, _, address) in enumerate(addresses):
            sock = None
            try:
                sock = socket.socket(family, socktype, proto)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.socket_keepalive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    for option, value in self.socket_keepalive_options.items():
                        sock.setsockopt(socket.IPPROTO_TCP, option, value)
                if index == 0 and timeout is not None:
                    # The lookup and the first connect share the connect timeout, so that one
                    # connect to a host with one address stays within it.
                    sock.settimeout(max(timeout - (time.monotonic() - started), 0.001))
                else:
                    sock.settimeout(timeout)
                sock.connect(address)
                sock.settimeout(self.socket_timeout)
                return sock
            except OSError as exc:
                error = exc
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
        if error is not None:
            raise error
        raise OSError("socket.getaddrinfo returned an empty list")


class ResolvingSSLConnection(redis.connection.SSLConnection, ResolvingConnection):
    """redis-py's TLS connection on a :class:`ResolvingConnection`: its ``_connect`` wraps the
    socket ours returns, checking the certificate against the URL's host name (and sending it as
    SNI), not against the address it was looked up to."""


class WholeReplyUnixConnection(WholeReplyReads, redis.connection.UnixDomainSocketConnection):
    """redis-py's Unix-socket connection (``unix://``), each reply read within
    ``socket_timeout`` in all, as :class:`ResolvingConnection` reads it (a path needs no
    lookup)."""
