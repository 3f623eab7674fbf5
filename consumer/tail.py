"""``tail``: print a project's events live, like ``tail -f`` for the event bus.

    python -m consumer tail 1                    # live from now, one readable line per event
    python -m consumer tail 1 2 --from-start     # the history of the current epoch, then live
    python -m consumer tail 1 --after 40 --json  # raw frames after seq 40 of the current epoch
    python -m consumer tail 1 --presence         # and a line per change of who is there

It is a :class:`~consumer.Consumer` like any other (reconnects forever, resumes from its cursor,
prints ``resync_required`` rather than ever skipping silently). The gateway URL comes from
``--url`` or ``$EVENTBUS_GATEWAY_URL`` (default ``ws://127.0.0.1:8765/``). The token comes from
``--token`` / ``$EVENTBUS_TOKEN``; or, with ``--secret`` / ``$EVENTBUS_AUTH_SECRET`` (the gateway's
own secret, for operators), a token naming the tailed projects is minted for every connection
(prefer the variable: other users of the machine can read flags in the process list).

Exit codes: 0 done (``--count`` reached), 2 usage error or a refusal by the gateway (token,
forbidden project), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import msgspec
import structlog

from consumer.client import Consumer, PresenceSubscription, Start, TokenSource, check_arguments
from consumer.presence import PresenceView
from consumer.types import (
    AuthenticationFailed,
    ConsumerError,
    Delivery,
    Item,
    Resync,
    UndecodableEvent,
)
from schemas.protocol import Member
from schemas.tokens import issue_token
from serverkit.arguments import non_negative_int, positive_int

__all__ = [
    "add_arguments",
    "format_item",
    "format_presence",
    "main",
    "run",
    "service_token",
    "tail",
]

DEFAULT_URL = "ws://127.0.0.1:8765/"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_MAX_TEXT = 80
DESCRIPTION = (
    "Print a project's events live, one readable line each (--json: the raw frames); reconnects "
    "and resumes by itself, and prints resync_required rather than ever skipping silently."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tail`` options, for a subcommand parser (``eventbus-publish tail``) or our own."""
    parser.add_argument(
        "project_ids",
        type=positive_int,
        nargs="+",
        metavar="PROJECT_ID",
        help="project(s) to follow",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--from-start",
        action="store_true",
        help="start with seq 1 of the current epoch (default: live from now)",
    )
    where.add_argument(
        "--after",
        type=non_negative_int,
        metavar="SEQ",
        help="start after SEQ of the current epoch",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the raw frames (one JSON object per line)"
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("EVENTBUS_GATEWAY_URL", DEFAULT_URL),
        help=f"gateway WebSocket URL (default: $EVENTBUS_GATEWAY_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EVENTBUS_TOKEN"),
        help="token for the gateway (default: $EVENTBUS_TOKEN)",
    )
    parser.add_argument(
        "--secret",
        default=None,
        help="mint tokens with this secret (default, without --token: $EVENTBUS_AUTH_SECRET)",
    )
    parser.add_argument(
        "--count", type=positive_int, metavar="N", help="exit after N events (default: never)"
    )
    parser.add_argument(
        "--presence",
        action="store_true",
        help="also print a line when people arrive, leave or change activity (docs/presence.md)",
    )


def _short(value: object) -> str:
    if isinstance(value, str):
        text = value if len(value) <= _MAX_TEXT else value[: _MAX_TEXT - 1] + "…"
        return msgspec.json.encode(text).decode()
    return str(value)


#: The fields worth a glance, per event type (``blocker.id`` is a nested field). Types not listed
#: here (a newer event) show every field.
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "blocker_created": (
        "blocker.id",
        "blocker.agent_id",
        "blocker.blocker_type",
        "blocker.task_id",
        "blocker.question",
    ),
    "blocker_resolved": ("blocker_id", "answer"),
    "agent_resumed": ("agent_id", "task_id", "blocker_id"),
    "blocker_expired": ("blocker_id", "task_id"),
}


def _fields(struct: msgspec.Struct, prefix: str = "") -> tuple[datetime | None, list[str]]:
    """``key=value`` of every field but the project id, and the first timestamp found."""
    when: datetime | None = None
    parts: list[str] = []
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if name == "project_id" and not prefix:
            continue
        if isinstance(value, datetime):
            when = when or value
            continue
        if isinstance(value, msgspec.Struct):
            inner_when, inner = _fields(value, f"{prefix}{name}.")
            when = when or inner_when
            parts += inner
            continue
        parts.append(f"{prefix}{name}={_short(value)}")
    return when, parts


def _time(value: datetime | None) -> str:
    value = value or datetime.now(UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def format_item(item: Item | UndecodableEvent, *, as_json: bool = False) -> str:
    """One line for an item: readable (time, project and seq, type, key fields), or the raw
    frame with ``as_json`` (a resync as the gateway's ``resync_required`` message)."""
    if isinstance(item, Delivery):
        if as_json:
            return item.raw.decode()
        when, parts = _fields(item.event)
        tag = type(item.event).__struct_config__.tag
        keys = KEY_FIELDS.get(tag)  # type: ignore[arg-type]
        if keys is not None:
            by_name = dict(part.split("=", 1) for part in parts)
            parts = [f"{key}={by_name[key]}" for key in keys if key in by_name]
        return f"{_time(when)}  p{item.project_id} #{item.seq}  {tag}  {' '.join(parts)}"
    if isinstance(item, Resync):
        if as_json:
            message = {"type": "resync_required", **msgspec.structs.asdict(item)}
            if message["tag"] is None:
                del message["tag"]  # (as the gateway says it: absent when not known)
            return msgspec.json.encode(message).decode()
        return (
            f"{_time(None)}  p{item.project_id} #{item.seq}  resync_required  "
            f"reason={item.reason} epoch={item.epoch} "
            "(events were missed: continuing after this seq)"
        )
    if as_json:
        return item.raw.decode()
    return f"{_time(None)}  p{item.project_id} #{item.seq}  undecodable  {item.reason}"


def _member(member: Member) -> str:
    name = f" ({_short(member.name)})" if member.name is not None else ""
    viewing = "-" if member.viewing is None else member.viewing
    answering = "-" if member.answering is None else member.answering
    return f"{_short(member.id)}{name} viewing={viewing} answering={answering}"


def format_presence(view: PresenceView, *, as_json: bool = False) -> str:
    """One line for a presence view: who arrived, left or changed, and how many are there (or
    that presence is unknown: reconnecting); with ``as_json``, the view as a JSON object of
    ``"type": "presence_view"`` (``members`` null while unknown)."""
    change = view.change
    if as_json:
        return msgspec.json.encode(
            {
                "type": "presence_view",
                "project_id": view.project_id,
                "members": view.members,
                "joined": change.joined,
                "left": change.left,
                "changed": change.changed,
            }
        ).decode()
    head = f"{_time(None)}  p{view.project_id}  presence"
    if view.members is None:
        return f"{head}  unknown (disconnected: the list comes back after the reconnect)"
    parts = [f"members={len(view.members)}"]
    parts += [f"joined={_member(m)}" for m in change.joined]
    parts += [f"left={_short(i)}" for i in change.left]
    parts += [f"changed={_member(m)}" for m in change.changed]
    return f"{head}  {'  '.join(parts)}"


async def _print_presence(presence: PresenceSubscription, out: TextIO, as_json: bool) -> None:
    try:
        async for view in presence:
            out.write(format_presence(view, as_json=as_json) + "\n")
            out.flush()
    except ConsumerError:
        return  # (a refusal of the project: its events iterator raises it too)


def service_token(secret: str, projects: list[int]) -> str:
    """A token for a service reading ``projects``: no ``sub``, so the gateway does not list it in
    the projects' presence (a tail is nobody on the dashboard)."""
    return issue_token(secret, projects)


async def tail(
    url: str,
    project_ids: Sequence[int],
    *,
    token: str | None = None,
    secret: str | None = None,
    start: Start = "now",
    as_json: bool = False,
    count: int | None = None,
    out: TextIO | None = None,
    presence: bool = False,
) -> int:
    """Print the projects' items to ``out`` until ``count`` events (forever without); returns
    the number of events printed. Raises :class:`~consumer.ConsumerError` on a refusal. With
    ``presence``, a line for each presence view of the projects too (not counted)."""
    out = out or sys.stdout
    source: TokenSource | None = token
    if token is None and secret:
        projects = list(project_ids)

        def mint() -> str:  # a fresh token for every connection and every refresh
            return service_token(secret, projects)

        source = mint

    printed = 0
    async with Consumer(url, token=source, start=start) as consumer:
        events = consumer.events(*project_ids)
        watchers = [
            asyncio.create_task(_print_presence(consumer.presence(p), out, as_json))
            for p in (project_ids if presence else ())
        ]
        try:
            while count is None or printed < count:
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    break
                except UndecodableEvent as exc:
                    item = exc
                out.write(format_item(item, as_json=as_json) + "\n")
                out.flush()
                if not isinstance(item, Resync):
                    printed += 1
        finally:
            for watcher in watchers:
                watcher.cancel()
    return printed


def run(args: argparse.Namespace, *, stdout: TextIO, stderr: TextIO, prog: str = "tail") -> int:
    """Run ``tail`` with arguments parsed by a parser :func:`add_arguments` set up; returns the
    exit code. Errors are reported as ``<prog>: error: ...`` on ``stderr``.

    To make it a subcommand of another CLI (``eventbus-publish tail``)::

        add_arguments(commands.add_parser("tail", help="print a project's events live"))
        ...
        if args.command == "tail":
            return run(args, stdout=stdout, stderr=stderr, prog="eventbus-publish tail")
    """
    start: Start = (
        "beginning" if args.from_start else args.after if args.after is not None else "now"
    )
    secret = args.secret or (None if args.token else os.environ.get("EVENTBUS_AUTH_SECRET"))
    # The consumer's logs (connected, reconnecting, ...) go to stderr: stdout is the events.
    try:
        check_arguments(args.url, start=start, token=args.token)
    except ValueError as exc:  # a URL that is not ws:// or wss://, a seq past 2**53-1, a token
        # that is not UTF-8 (argv and the environment hold lone surrogates for such bytes)
        stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(stderr))  # a write per line
    try:
        asyncio.run(
            tail(
                args.url,
                args.project_ids,
                token=args.token,
                secret=secret,
                start=start,
                as_json=args.json,
                count=args.count,
                out=stdout,
                presence=args.presence,
            )
        )
    except ConsumerError as exc:
        hint = ""
        if isinstance(exc, AuthenticationFailed) and args.token is None and not secret:
            # The usual first run: a gateway with auth, and no flag or variable set yet.
            hint = (
                "; pass --token (or $EVENTBUS_TOKEN), or --secret (or"
                " $EVENTBUS_AUTH_SECRET, the gateway's) to mint one"
            )
        stderr.write(f"{prog}: error: {exc}{hint}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m consumer tail",
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``tail`` as a program: ``argv`` are its arguments (without ``tail`` itself)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, stdout=stdout or sys.stdout, stderr=stderr or sys.stderr, prog=prog)
