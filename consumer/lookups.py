"""Blocking calls of the consumer, host name lookups included, in daemon threads of its own.

asyncio runs blocking work in the event loop's default executor, its own host name lookups
(``loop.getaddrinfo``, which ``loop.create_connection`` and so websockets' connect use) too.
Nothing can end a lookup (``getaddrinfo``) blocked on a resolver that does not answer: a timeout
stops the wait for it, not the lookup, which holds its executor thread until the resolver gives
up (with glibc, 5 s per try, 2 tries, for each name server and each search domain). While it
does, ``asyncio.run`` does not return (it waits for the default executor's threads on exit), and
once every thread of that executor (``min(32, CPUs + 4)``) waits so, the program's own
``run_in_executor(None, ...)`` (``asyncio.to_thread``) waits behind them.

:func:`in_daemon_thread` runs a call in a daemon thread of its own, which the program's exit
does not wait for; its caller may stop waiting (a timeout, a cancellation) whenever it likes.
:func:`getaddrinfo` looks a name up so, one lookup of a name at a time: callers asking for a
name still being looked up wait for that lookup's answer, so attempts that keep reconnecting
to a name while the resolver hangs start no thread each. :func:`open_socket` makes a TCP
connection to a host by its name so, every address the lookup gives tried in turn, as
``loop.create_connection`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["getaddrinfo", "in_daemon_thread", "is_ip_address", "open_socket", "settle_threadsafe"]

T = TypeVar("T")

#: (host, port) -> the callers waiting for its lookup, which is under way in its thread.
_lookups: dict[tuple[str, int], list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]]] = {}
_lookups_lock = threading.Lock()


def _forget_lookups_in_child() -> None:
    # A forked child has none of its parent's lookup threads: their callers would wait for ever.
    global _lookups_lock
    _lookups.clear()
    _lookups_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_lookups_in_child)


async def in_daemon_thread(function: Callable[[], T], name: str) -> T:
    """``function()``'s result (or its exception), called in a daemon thread named ``name``.

    A caller that stops waiting (a timeout, a cancellation) leaves the call to finish in its
    thread; its outcome is dropped then."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # every outcome is the awaiting caller's
            settle_threadsafe(loop, answer, None, exc)
        else:
            settle_threadsafe(loop, answer, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await answer


def settle_threadsafe(
    loop: asyncio.AbstractEventLoop,
    answer: asyncio.Future[Any],
    result: object,
    error: BaseException | None,
) -> None:
    """Hand a thread's outcome to the loop; nothing when nobody waits for it any more (the
    caller timed out or was cancelled, or the loop has closed)."""

    def settle() -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
        loop.call_soon_threadsafe(settle)


async def getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo(host, port, 0, SOCK_STREAM)``, looked up in a daemon thread; a
    lookup of the same name and port under way (for another attempt, or another consumer) is
    waited for instead of a new one. Bound the wait with a timeout: the lookup itself goes on
    until the resolver answers or gives up."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
    key = (host, port)
    with _lookups_lock:
        waiting = _lookups.get(key)
        start = waiting is None
        if waiting is None:
            waiting = _lookups[key] = []
        waiting.append((loop, answer))
    if start:
        thread = threading.Thread(
            target=_look_up, args=(key,), name="eventbus-consumer-lookup", daemon=True
        )
        try:
            thread.start()
        except BaseException:  # (no thread: nothing would ever answer this lookup's callers)
            with _lookups_lock:
                _lookups.pop(key, None)
            raise
    try:
        return await answer
    finally:
        with _lookups_lock, contextlib.suppress(ValueError):
            waiting.remove((loop, answer))  # (still there: this caller stopped waiting)


def _look_up(key: tuple[str, int]) -> None:
    host, port = key
    result: list[tuple[Any, ...]] | None = None
    error: BaseException | None = None
    try:
        result = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except BaseException as exc:
        error = exc
    with _lookups_lock:
        waiting = list(_lookups.pop(key, []))  # (a copy: callers leave the list meanwhile)
    for loop, answer in waiting:
        settle_threadsafe(loop, answer, result, error)


async def open_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket connected to ``host``'s first address that accepts, the name
    looked up by :func:`getaddrinfo`; as ``loop.create_connection`` does, every address is tried
    in its order, and the error of the last one (or of all, when they differ) is raised."""
    loop = asyncio.get_running_loop()
    infos = await getaddrinfo(host, port)
    if not infos:
        raise OSError(f"getaddrinfo() returned an empty list for {host!r}")
    errors: list[OSError] = []
    for family, type_, proto, _, address in infos:
        sock = None
        try:
            # (in the try: a family the system lacks, IPv6 disabled, is a failed address)
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            if sock is not None:
                sock.close()
            errors.append(exc)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        else:
            return sock
    if len({str(error) for error in errors}) == 1:
        raise errors[-1]
    raise OSError(f"Multiple exceptions: {', '.join(str(error) for error in errors)}")


def is_ip_address(host: str) -> bool:
    """``host`` is an IP address (asyncio connects to it without a lookup)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
