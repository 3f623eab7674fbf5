"""uvicorn serving the HTTP publish API: its configuration, and a deadline for request headers.

uvicorn bounds a request body only by what the application does (``--body-timeout``) and an idle
keep-alive connection by ``timeout_keep_alive``, which every byte received cancels; nothing
bounds the wait for a request's headers. A client that connected and sent nothing, or sent its
headers a byte every few seconds (slowloris), held its connection for ever, and every connection
counts against ``--limit-concurrency``: a thousand of them made the API answer 503 to everyone.
:class:`HeaderDeadlineProtocol` closes a connection whose request headers are not complete
within ``--header-timeout`` of its start or of the previous answer.

Imported only to serve (uvicorn is the ``http-api`` extra).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from publisher.http_api.app import HttpApiSettings, PublishApi

__all__ = ["HeaderDeadlineProtocol", "server_config"]


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection (without an answer) whose request
    headers are not complete within :attr:`header_timeout` seconds of the connection's start, or
    of the answer to its previous request. A request whose headers arrived is bounded by the
    application from then on (``--body-timeout``, the publisher's ``timeout``)."""

    header_timeout: float = HttpApiSettings().header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._unanswered = 0  # requests whose headers arrived and whose answer is not complete
        self._header_deadline: asyncio.TimerHandle | None = None
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._unanswered += 1
        self._cancel_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._unanswered -= 1
        super().on_response_complete()
        if self._unanswered == 0:  # (a pipelined request's headers are already in)
            self._await_headers()

    def _await_headers(self) -> None:
        self._cancel_deadline()
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._unanswered == 0 and not self.transport.is_closing():
            self.transport.close()


def server_config(
    app: PublishApi, *, host: str = "127.0.0.1", port: int = 8766, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration serving ``app``: httptools with the header deadline of
    ``app.settings.header_timeout``; ``options`` are further ``uvicorn.Config`` arguments
    (``limit_concurrency``, ``log_level``, ...)."""
    protocol = type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": app.settings.header_timeout},
    )
    settings: dict[str, Any] = {
        "loop": "asyncio",
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        **options,
    }
    return uvicorn.Config(app, host=host, port=port, http=protocol, **settings)
