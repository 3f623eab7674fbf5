"""structlog set-up of the project's server processes: JSON lines in production, readable
columns on a terminal, always to stderr, and never a raise for a line that cannot be written.

The gateway (``--log-format``, ``--log-level``), the HTTP publish API and the outbox relay
configure their logging here, so each writes the same lines the same way, its library loggers
(websockets, redis-py, uvicorn, psycopg) included.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Literal, TextIO, get_args

import structlog

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LogLevel",
    "UnfailingWriter",
    "add_log_arguments",
    "configure_logging",
    "log_arguments_error",
]

#: What ``fmt`` of :func:`configure_logging` takes.
LOG_FORMATS = ("auto", "json", "console")
#: The log levels, lower-case; ``--log-level`` takes them in any case.
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
#: What ``--log-level`` takes (in any case).
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


def add_log_arguments(parser: argparse.ArgumentParser, *, default_format: str = "auto") -> None:
    """``--log-format`` and ``--log-level``, defaulting to ``$EVENTBUS_LOG_FORMAT`` (else
    ``default_format``) and ``$EVENTBUS_LOG_LEVEL`` (else info), as the HTTP API and the outbox
    relay take them. argparse checks the flags against their choices, not the defaults the
    environment gives: :func:`configure_logging` raises ValueError for those."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("EVENTBUS_LOG_FORMAT", default_format),
        help="json, or console (columns); auto: console on a terminal, else json "
        f"(default $EVENTBUS_LOG_FORMAT, else {default_format}). Logs go to stderr",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,  # INFO as well as info
        choices=LOG_LEVELS,
        default=os.environ.get("EVENTBUS_LOG_LEVEL", "info").lower(),
        help="in any case (default $EVENTBUS_LOG_LEVEL, else info)",
    )


def log_arguments_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the ``--log-format``/``--log-level`` that :func:`add_log_arguments`
    parsed, or None. argparse checks the flags against their choices, not the defaults that the
    environment gave them: the message names the variable."""
    for variable, value, known in (
        ("EVENTBUS_LOG_FORMAT", args.log_format, LOG_FORMATS),
        ("EVENTBUS_LOG_LEVEL", args.log_level, LOG_LEVELS),
    ):
        if value not in known:
            return f"{variable}={value!r}: expected one of {', '.join(known)}"
    return None


def configure_logging(fmt: str = "auto", level: str = "info") -> int:
    """Route structlog, and the stdlib loggers of the libraries (at WARNING and above, or
    ``level`` when higher), to stderr; returns ``level`` as a number.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise);
    ``level`` a logging level name (``debug``, ``info``, ...). ValueError for others.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    # Only the five names: the logging module also knows WARN, FATAL and NOTSET (everything).
    numeric = (
        logging.getLevelNamesMapping().get(level.upper()) if level.lower() in LOG_LEVELS else None
    )
    if numeric is None:
        raise ValueError(f"log level {level!r}: expected debug, info, warning, error or critical")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # JSON carries an exception as its traceback's text; the console renderer draws it itself.
    exc_text = structlog.processors.format_exc_info if fmt == "json" else _identity
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), exc_text, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (print() makes two: the line, then its newline): workers of a group
        # share the output, and with PYTHONUNBUFFERED (the container image sets it) two lines
        # written at the same moment interleaved into one that no log collector could parse.
        logger_factory=structlog.WriteLoggerFactory(UnfailingWriter(sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Library loggers (websockets' handshake failures, redis-py, uvicorn) go through the same
    # renderer, their exceptions (``exc_info``: uvicorn's "Exception in ASGI application") as
    # tracebacks too: JSON wrote an exc_info tuple as three reprs, the traceback's place lost.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processors=[*shared, _drop_meta, exc_text, renderer])
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    return numeric


class UnfailingWriter:
    """A log output whose lines that cannot be written are dropped, never raised to the code
    that logs them.

    stderr may be a pipe whose reader is gone (``eventbus-gateway | jq`` stopped with Ctrl-C,
    whose reader dies first; a log shipper that crashed): every write then fails with EPIPE,
    and a log line raised from wherever it was logged. A gateway group's supervisor logged
    ``stop signal`` before it stopped, so SIGTERM changed nothing and only SIGKILL ended the
    group. (The stdlib loggers' handler drops such lines by itself.)"""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
        except (OSError, ValueError):  # EPIPE, EIO, ENOSPC; ValueError: the file was closed
            pass

    def flush(self) -> None:
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass


def _identity(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict


def _drop_meta(_logger: Any, _name: str, event_dict: Any) -> Any:
    event_dict.pop("_record", None)
    event_dict.pop("_from_structlog", None)
    return event_dict
