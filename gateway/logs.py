"""structlog set-up: JSON lines in production, readable columns on a terminal."""

from __future__ import annotations

import logging
from typing import Any

import structlog

import serverkit.logs
from serverkit import LogThrottle

__all__ = [
    "ConnectionLog",
    "configure_logging",
    "describe",
    "get_logger",
    "peer_of",
    "throttle_loop_errors",
]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog (and the stdlib loggers of websockets and redis) to stderr
    (:func:`serverkit.logs.configure_logging`).

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    global _debug_enabled
    _debug_enabled = serverkit.logs.configure_logging(fmt, level) <= logging.DEBUG


def describe(exc: BaseException) -> str:
    """An exception as a log field: its message, or its type's name when it has none (a
    deadline's ``TimeoutError`` has no message, which logged an empty ``error``)."""
    return str(exc) or type(exc).__name__


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class ConnectionLog:
    """One connection's logger, bound to its id (and its peer's address, or its transport) on
    first use.

    Most connections never log a line (``debug`` is off in production), and a bound structlog
    logger kept for a connection's lifetime is ~0.3 KiB and a few microseconds to build: at
    100,000 connections, ~30 MiB for nothing. This object is 64 bytes.
    """

    __slots__ = ("_bound", "_connection", "_logger", "conn_id", "transport")

    def __init__(
        self, logger: Any, conn_id: int, *, connection: Any = None, transport: str | None = None
    ) -> None:
        self._logger = logger
        self.conn_id = conn_id
        self._connection = connection  # anything with websockets' ``remote_address``
        self.transport = transport
        self._bound: Any = None

    def _get(self) -> Any:
        if self._bound is None:
            fields: dict[str, Any] = {"conn_id": self.conn_id}
            if self._connection is not None:
                fields["peer"] = peer_of(self._connection)
            if self.transport is not None:
                fields["transport"] = self.transport
            self._bound = self._logger.bind(**fields)
            self._connection = None
        return self._bound

    def debug(self, event: str, **fields: Any) -> None:
        if self._bound is not None or _debug_enabled:
            self._get().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._get().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._get().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._get().error(event, **fields)


def peer_of(connection: Any) -> str | None:
    """``host:port`` of a connection's peer (anything with websockets' ``remote_address``), or
    None when it is not known (a closed transport, a Unix socket)."""
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return None


#: Whether debug lines are written: set by configure_logging (before it, assume they are).
_debug_enabled = True


def throttle_loop_errors(loop, throttle: LogThrottle | None = None) -> None:
    """Limit what asyncio itself logs through ``loop``'s exception handler to a few lines per
    minute per message (``throttle``, default 5 per minute).

    asyncio logs some conditions once per occurrence: with every descriptor in use, each accept
    attempt logs "socket.accept() out of system resource" at error level, which a client flood
    turns into hundreds of thousands of lines. Counting them is the metrics' job; the log keeps
    the first few of each kind and how many were dropped.
    """
    throttle = throttle or LogThrottle()

    def handler(loop, context: dict) -> None:
        suppressed = throttle.allow(str(context.get("message", ""))[:100])
        if suppressed is None:
            return
        if suppressed:
            context = {**context, "message": f"{context.get('message')} ({suppressed} suppressed)"}
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
