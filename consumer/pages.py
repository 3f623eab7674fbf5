"""Catch-up pages: one ``GET`` of the polling endpoint, read whole within a deadline.

The consumer reads a long backlog from the gateway's polling endpoint (docs/consumer.md,
"Catching up a long backlog"), page by page. urllib makes the request in a thread of its own;
:func:`read_page` bounds the whole request (the host name lookup included), not each read, and
a cancelled caller ends the thread's request at once. A 503 (the gateway drains, is full, or
Redis is away) is :class:`PageUnavailable`, with the ``Retry-After`` it gave: the page is to
be asked again. A redirect is not followed (an HTTPError, like any other answer that is not a
page).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from consumer.lookups import in_daemon_thread

__all__ = ["MAX_PAGE_BYTES", "PageRequest", "PageUnavailable", "read_page"]

#: Largest catch-up page read: 1,000 of the largest events the contract allows are ~30 MB.
MAX_PAGE_BYTES = 64 * 1024 * 1024


class PageUnavailable(Exception):
    """The gateway answered the page with HTTP 503: it drains, it is full, or Redis did not
    answer. Nothing is wrong with the request: ask again, after ``retry_after`` seconds when the
    answer said (``Retry-After`` in seconds; None when it did not, or not as a number)."""

    def __init__(self, retry_after: float | None, error: str = "") -> None:
        super().__init__(f"the gateway answered 503 {error}".strip())
        self.retry_after = retry_after
        self.error = error


def retry_after(header: str | None) -> float | None:
    """A ``Retry-After`` header's seconds, or None. Headers are ISO-8859-1: only ASCII digits
    are a number ("\u00b2" passes str.isdigit, and float() raises on it)."""
    header = (header or "").strip()
    if header.isascii() and header.isdigit():
        return float(header)
    return None


async def read_page(url: str, token: str | None, within: float) -> bytes:
    """The body of ``url`` read whole within ``within`` seconds (TimeoutError after it); any
    other failure raises. Cancelling the caller ends the request now.

    The request runs in a daemon thread of its own, not the loop's executor, and the caller
    waits for its answer at most ``within``: a cut ends the thread's reads and connects at once,
    but nothing can end a host name lookup (``getaddrinfo``) blocked on a resolver that does not
    answer. Such a lookup is left to finish in its thread (a connection made then is closed at
    once), while the caller has its TimeoutError in time, and ``asyncio.run`` does not wait for
    it on exit (it waits for the default executor's threads)."""
    request = PageRequest()
    try:
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives with the
        # answer (it returns the page, or raises its error), and the closed consumer went on.
        async with asyncio.timeout(within):
            return await in_daemon_thread(
                lambda: request.get(url, token, within), "eventbus-consumer-page"
            )
    finally:
        request.cut()  # late, or cancelled (the consumer closed): the thread ends now, too


class PageRequest:
    """One GET of a catch-up page, made by urllib in a worker thread, that the event loop can end
    at any time with :meth:`cut`: the request's sockets are shut down, so a read blocked on them
    returns at once and the thread with it.

    urllib's ``timeout`` bounds each read, not the request: a server sending a byte now and then
    (its headers, or a body that never completes) held the page, the catch-up and the project
    (whose WebSocket events are dropped meanwhile) for ever, and the thread kept ``asyncio.run``
    from returning. Sockets are shut down through duplicates of their descriptors, which only
    this object closes (under its lock): never a descriptor the thread closed and the process
    reused meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: list[socket.socket] = []
        self._cut = False

    def get(self, url: str, token: str | None, timeout: float) -> bytes:
        """The body of ``url`` (at most :data:`MAX_PAGE_BYTES`); any failure raises, and a cut
        request raises TimeoutError."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, headers=headers)
        opener = urllib.request.build_opener(
            _TrackedHTTPHandler(self._connect),
            _TrackedHTTPSHandler(self._connect),
            _NoRedirect(),
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(MAX_PAGE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code != 503:
                    raise
                error = _error_code(exc)
                raise PageUnavailable(retry_after(exc.headers.get("Retry-After")), error) from None
        except Exception:
            if self._cut:
                raise TimeoutError("the page was not read in time") from None
            raise
        finally:
            with self._lock:
                self._cut = True  # no connection after this one
                for handle in self._handles:
                    handle.close()
                self._handles.clear()
        if len(body) > MAX_PAGE_BYTES:
            raise ValueError(f"a page of more than {MAX_PAGE_BYTES} bytes")
        return body

    def cut(self) -> None:
        """End the request now (from any thread): its reads fail, it connects no more."""
        with self._lock:
            self._cut = True
            for handle in self._handles:
                with contextlib.suppress(OSError):
                    handle.shutdown(socket.SHUT_RDWR)

    def _connect(self, *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        with self._lock:
            if not self._cut:
                self._handles.append(sock.dup())
                return sock
        sock.close()
        raise TimeoutError("the page was not read in time")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (an HTTPError), not followed. The gateway's polling endpoint
    never redirects, and urllib follows one anywhere with the request's headers: the token's
    ``Authorization`` to another host, or over plain http; and to ``ftp://``, whose connection
    is not one of the tracked sockets that the page's deadline shuts down."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _error_code(exc: urllib.error.HTTPError) -> str:
    """The ``error`` of a refusal's JSON body (``draining``, ``too_many_connections``,
    ``unavailable``), read up to 4 KiB, or "" (another body, or none in time)."""
    try:
        body = json.loads(exc.read(4096))
    except (OSError, ValueError, RecursionError, http.client.HTTPException):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error[:64] if isinstance(error, str) else ""


def _tracked(connection_class: type[http.client.HTTPConnection], connect: Callable[..., Any]):
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = connection_class(host, **kwargs)
        connection._create_connection = connect  # type: ignore[attr-defined]
        return connection

    return make


class _TrackedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connect: Callable[..., Any]) -> None:
        super().__init__()
        self._connect = connect

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_tracked(http.client.HTTPConnection, self._connect), req)


class _TrackedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connect: Callable[..., Any]) -> None:
        super().__init__()
        self._connect = connect

    def https_open(self, req: urllib.request.Request) -> Any:
        # No context: the connection makes the default one, as with urlopen.
        return self.do_open(_tracked(http.client.HTTPSConnection, self._connect), req)
