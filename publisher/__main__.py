"""``python -m publisher`` / ``eventbus-publish``: publish events, read history, mint and revoke
tokens.

For operators and for trying the gateway by hand::

    eventbus-publish publish '{"type":"blocker_resolved","project_id":1,"blocker_id":123,
                               "answer":"Use JWT","resolved_at":"2025-11-08T12:45:30Z"}'
    cat events.jsonl | eventbus-publish publish          # one event per line, or a JSON array
    eventbus-publish history 1 --after 40 --limit 20
    eventbus-publish token --project 1 --project 2 --ttl 900 --subject user-7
    eventbus-publish revoke-tokens user-7        # refuse user-7's tokens issued until now

``--redis-url`` defaults to ``$EVENTBUS_REDIS_URL`` (else ``redis://127.0.0.1:6379/0``),
``--prefix`` to ``$EVENTBUS_PREFIX`` (else ``eventbus``), ``token --secret`` to
``$EVENTBUS_AUTH_SECRET`` (the gateway's variable; prefer it to the flag, which other users of the
machine can read in the process list).

``revoke-tokens --max-revocations`` defaults to ``$EVENTBUS_MAX_REVOCATIONS`` (else 100000, the
publisher's default cap of the revocation list; the HTTP API reads the same variable).

Exit codes: 0 success, 1 Redis answered with an error, 2 usage or validation error (nothing was
published or revoked), 3 Redis unavailable, 4 the token revocation list is full (a new subject
was not revoked), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn, TextIO

import msgspec
import redis
import redis.exceptions

from publisher.client import DEFAULT_KEEP_FOR, Publisher
from publisher.core import (
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    RevocationListFull,
)
from schemas import lua
from schemas.events import (
    TOO_DEEP,
    EventValidationError,
    ProjectEvent,
    decode_event,
    repeated_key,
)
from schemas.keys import DEFAULT_PREFIX, Keys, stream_entry_seq
from schemas.presence import DEFAULT_MAX_MEMBERS
from schemas.revocations import DEFAULT_MAX_REVOCATIONS, MAX_REVOCATIONS
from schemas.stored import MAX_ENTRY_BYTES, ForeignValue, parse_meta, parse_stream_entries
from schemas.tokens import issue_token
from serverkit.arguments import non_negative_int, positive_int, seconds

__all__ = ["main"]

#: The name the user typed: the console script, or the module form.
PROG = "python -m publisher" if sys.argv[0].endswith("__main__.py") else "eventbus-publish"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
EXIT_OK = 0
EXIT_REDIS_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
#: ``revoke-tokens`` of a new subject while the revocation list is full (RevocationListFull):
#: not a Redis failure (1) nor a mistake in the command (2), and retrying does not help until
#: an operator acts (docs/publisher.md, "When the list is full").
EXIT_REVOCATIONS_FULL = 4
EXIT_INTERRUPTED = 130
MAX_HISTORY_LIMIT = 10_000
_REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    # Redis Cluster without a reachable node or a master for the slot: transient, as for the
    # publisher (publisher.client._UNAVAILABLE).
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)


class CliError(Exception):
    """Reported as ``eventbus-publish: error: <message>`` with ``exit_code``; never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own message and exit code 2, plus the usage of the subcommand at fault.
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _limit(text: str) -> int:
    value = positive_int(text)
    if value > MAX_HISTORY_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_HISTORY_LIMIT}, got {value}")
    return value


def _unix_time(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected unix seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected unix seconds (>= 0), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""

    # Connection options are accepted before or after the subcommand. On the subcommands they
    # default to SUPPRESS, so they only override the top-level value when actually given.
    def connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
        group = parser.add_argument_group("connection")
        group.add_argument(
            "--redis-url",
            default=(
                os.environ.get("EVENTBUS_REDIS_URL", DEFAULT_REDIS_URL)
                if top
                else argparse.SUPPRESS
            ),
            help="redis://, rediss://, unix:// or redis+cluster:// URL "
            f"(default: $EVENTBUS_REDIS_URL or {DEFAULT_REDIS_URL})",
        )
        group.add_argument(
            "--prefix",
            default=os.environ.get("EVENTBUS_PREFIX", DEFAULT_PREFIX) if top else argparse.SUPPRESS,
            help="key prefix shared with the gateway (default: $EVENTBUS_PREFIX or eventbus)",
        )

    parser = _Parser(
        prog=PROG,
        description="Publish event-bus events, read a project's history, mint and revoke "
        "browser tokens.",
        epilog="Exit codes: 0 ok, 1 Redis error, 2 usage/validation error (nothing published "
        "or revoked), 3 Redis unavailable, 4 the token revocation list is full (nothing "
        "revoked).",
    )
    connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    publish = commands.add_parser(
        "publish",
        help="validate and publish events; prints one cursor per event",
        description="Validate and publish events. EVENT is one event as JSON; without it (or "
        "with '-') events are read from stdin: one JSON object, a JSON array, or one object per "
        "line. Every event is validated before anything is published. Prints one cursor per "
        'event: {"project_id":1,"epoch":"...","seq":42}.',
    )
    publish.add_argument("event", nargs="?", default="-", metavar="EVENT")
    publish.add_argument(
        "--idempotency-key",
        help="publish at most once per key within the idempotency window (10 min); a retry "
        "prints the first publish's cursor (one event only)",
    )
    connection_options(publish, top=False)

    history = commands.add_parser(
        "history",
        help="print a project's cursor and the stored frames after a sequence number",
        description="Print a JSON header (project_id, epoch, seq = top, oldest stored seq, "
        "count, more, trimmed) and then the stored frames with seq > AFTER, one per line, "
        "oldest first. Read-only.",
    )
    history.add_argument("project_id", type=positive_int, metavar="PROJECT_ID")
    history.add_argument(
        "--after", type=non_negative_int, default=0, help="last seq already seen (default 0)"
    )
    history.add_argument(
        "--limit",
        type=_limit,
        default=100,
        help=f"maximum frames to print, 1-{MAX_HISTORY_LIMIT} (default 100)",
    )
    connection_options(history, top=False)

    presence = commands.add_parser(
        "presence",
        help="print who is on a project's dashboards now (docs/presence.md)",
        description="Print the project's members, merged over every gateway pod: one line per "
        "member (id, name, viewing, answering), or JSON with --json. Read-only.",
    )
    presence.add_argument("project_id", type=positive_int, metavar="PROJECT_ID")
    presence.add_argument("--json", action="store_true", help="one JSON array of members")
    presence.add_argument(
        "--presence-max-members",
        type=positive_int,
        default=DEFAULT_MAX_MEMBERS,
        metavar="N",
        help="the gateways' --presence-max-members, when not the default 1000 (a pod listing "
        "more than a read of the default takes is left out whole)",
    )
    connection_options(presence, top=False)

    # Programs of their own, reached through this command too; everything after the subcommand
    # is theirs (``eventbus-publish relay --help`` shows their options).
    for name, help_text in _DELEGATED.items():
        delegated = commands.add_parser(name, help=help_text, add_help=False)
        delegated.add_argument("delegated_args", nargs=argparse.REMAINDER)

    token = commands.add_parser(
        "token",
        help="mint a short-lived browser token for some projects",
        description="Mint a JWT (HS256) the gateway accepts, naming the projects it may read.",
    )
    token.add_argument(
        "--secret",
        default=os.environ.get("EVENTBUS_AUTH_SECRET"),
        help="signing secret shared with the gateway (default: $EVENTBUS_AUTH_SECRET)",
    )
    projects = token.add_mutually_exclusive_group(required=True)
    projects.add_argument(
        "--project",
        dest="projects",
        type=positive_int,
        action="append",
        metavar="ID",
        help="a project the token may read (repeat for several)",
    )
    projects.add_argument(
        "--all-projects", action="store_true", help="every project (trusted tools only)"
    )
    token.add_argument(
        "--ttl", type=seconds, default=900.0, help="lifetime in seconds (default 900)"
    )
    token.add_argument("--subject", help="who the token is for (the JWT 'sub')")

    keep_hours = DEFAULT_KEEP_FOR.total_seconds() / 3600
    revoke = commands.add_parser(
        "revoke-tokens",
        help="refuse a subject's tokens issued until now, and close its connections",
        description="Refuse the tokens of SUBJECT (the JWT 'sub') issued before a time, on "
        "every gateway: their connections are closed (code 4003) within about a second and the "
        "tokens refused; tokens issued since stay valid, so mint a new one for a person who "
        "keeps access. Merges with an earlier revocation of SUBJECT (the later of each time "
        "wins). Prints the entry after the merge: "
        '{"subject":"...","issued_before":<unix s>,"expires_at":<unix s>}.',
    )
    revoke.add_argument("subject", metavar="SUBJECT", help="the tokens' 'sub'")
    revoke.add_argument(
        "--issued-before",
        type=_unix_time,
        default=None,
        metavar="UNIX",
        help="refuse the tokens issued before this time, in unix seconds (default: now, by "
        "Redis' clock, rounded up to the next second; at most a minute in the future)",
    )
    revoke.add_argument(
        "--keep-for",
        type=seconds,
        default=DEFAULT_KEEP_FOR.total_seconds(),
        metavar="SECONDS",
        help="how long the gateways keep refusing them, from --issued-before: at least the "
        "longest lifetime of the tokens you issue plus 5 s (the gateways take a token up to 5 s "
        f"past its exp), at most 366 days (default {keep_hours:g} h)",
    )
    revoke.add_argument(
        "--max-revocations",
        type=positive_int,
        default=os.environ.get("EVENTBUS_MAX_REVOCATIONS", str(DEFAULT_MAX_REVOCATIONS)),
        metavar="N",
        help="the cap of the revocation list: a new subject is refused (exit code 4) when the "
        "list holds N entries after the expired ones are swept; a subject already in it is "
        f"updated; at most {MAX_REVOCATIONS}, the most a gateway reads (default: "
        f"$EVENTBUS_MAX_REVOCATIONS or {DEFAULT_MAX_REVOCATIONS})",
    )
    connection_options(revoke, top=False)
    return parser


# --- publish ----------------------------------------------------------------------------------


def _read_events(source: str, stdin: TextIO) -> list[ProjectEvent]:
    """Parse and validate every event first, so that one bad line publishes nothing."""
    if source == "-":
        if stdin.isatty():
            raise CliError("give an EVENT as JSON, or pipe events on stdin")
        text = stdin.read()
    else:
        text = source
    if not text.strip():
        raise CliError("no event given (empty input)")
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, escaped by Python (argv, a C locale)
        raise CliError("invalid event: the input is not valid UTF-8") from None
    try:
        document = msgspec.json.decode(text)
        key = repeated_key(text) if isinstance(document, (dict, list)) else None
    except msgspec.DecodeError:
        document = key = None  # not one JSON document: JSON lines, parsed below
    except (RecursionError, EventValidationError):
        raise CliError(f"invalid event: {TOO_DEEP}") from None
    if key is not None:
        raise CliError(f"invalid event: the key {key!r} is given twice in one object")
    if isinstance(document, dict):
        return [_validate(text, "event")]
    if isinstance(document, list):
        if not document:
            raise CliError("no event given (empty array)")
        return [
            _validate(msgspec.json.encode(item), f"event {i}") for i, item in enumerate(document, 1)
        ]
    if document is not None:
        raise CliError(f"invalid event: expected a JSON object, got {type(document).__name__}")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [_validate(line, f"line {n}") for n, line in lines]


def _validate(data: bytes | str, where: str) -> ProjectEvent:
    try:
        return decode_event(data)
    except EventValidationError as exc:
        raise CliError(f"invalid {where}: {exc}") from None


def _publish(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    events = _read_events(args.event, stdin)
    if args.idempotency_key is not None and len(events) != 1:
        raise CliError("--idempotency-key needs exactly one event")
    partial: PublishManyError | None = None
    with _publisher(args) as publisher:
        try:
            if len(events) == 1:
                cursors = [publisher.publish(events[0], idempotency_key=args.idempotency_key)]
            else:
                cursors = publisher.publish_many(events)
        except ValueError as exc:  # e.g. a malformed idempotency key: raised before any I/O
            raise CliError(str(exc)) from None
        except PublishManyError as exc:  # some projects refused: say exactly what was written
            partial, cursors = exc, exc.cursors
    for event, cursor in zip(events, cursors, strict=True):
        line = (
            {"project_id": event.project_id, "epoch": cursor.epoch, "seq": cursor.seq}
            if cursor is not None
            else {"project_id": event.project_id, "published": False}
        )
        stdout.write(msgspec.json.encode(line).decode() + "\n")
    if partial is not None:
        raise CliError(str(partial), EXIT_REDIS_ERROR)
    return EXIT_OK


def _publisher(args: argparse.Namespace, **options: int) -> Publisher:
    try:
        return Publisher.from_url(args.redis_url, prefix=args.prefix, **options)
    except ValueError as exc:  # bad URL or prefix
        raise CliError(str(exc)) from None


# --- history ----------------------------------------------------------------------------------


def _presence(args: argparse.Namespace, stdout: TextIO) -> int:
    try:
        publisher = Publisher.from_url(args.redis_url, prefix=args.prefix)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        members = publisher.presence(args.project_id, max_members=args.presence_max_members)
    finally:
        publisher.close()
    if args.json:
        stdout.write(msgspec.json.encode(members).decode() + "\n")
        return EXIT_OK
    if not members:
        stdout.write(f"nobody on project {args.project_id}\n")
    for member in members:
        doing = []
        if member.viewing is not None:
            doing.append(f"viewing {member.viewing}")
        if member.answering is not None:
            doing.append(f"answering {member.answering}")
        name = f" ({member.name})" if member.name else ""
        stdout.write(f"{member.id}{name}: {', '.join(doing) or 'online'}\n")
    return EXIT_OK


def _history(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        keys = Keys(args.prefix)
        publisher = Publisher.from_url(args.redis_url, prefix=args.prefix)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    meta_key, stream_key = keys.meta(args.project_id), keys.stream(args.project_id)

    def read() -> list:
        # One script: the cursor and the entries are read at the same instant, and an entry too
        # heavy to be a frame (another writer's) comes back as its weight, never whole.
        # Read-only: unlike the gateway's snapshot script, it never creates an epoch.
        return publisher.client.eval(
            lua.HISTORY,
            2,
            meta_key,
            stream_key,
            f"{args.after + 1}-0",
            args.limit + 1,
            MAX_ENTRY_BYTES,
        )

    try:
        # Bounded like a publish: PublisherUnavailable within the publisher's timeout (10 s).
        reply = publisher._run(read, time.monotonic())
    except redis.exceptions.ResponseError as exc:  # WRONGTYPE: a key of another type
        raise CliError(f"cannot read project {args.project_id}: {exc}", EXIT_REDIS_ERROR) from None
    finally:
        publisher.close()
    if not _history_reply_shaped(reply):  # not Redis, or a broken one (a proxy, a MITM)
        raise CliError(
            f"unexpected reply from Redis to the history read: {reply!r}"[:300], EXIT_REDIS_ERROR
        )
    (epoch, top), oldest, entries = reply
    try:
        meta = parse_meta(epoch, top)
    except ForeignValue as exc:
        raise CliError(
            f"{meta_key} holds a value the publisher did not write: {exc}", EXIT_REDIS_ERROR
        ) from None
    more = len(entries) > args.limit
    frames, foreign = parse_stream_entries(entries[: args.limit], args.project_id)
    for seq, problem in foreign:  # shown, never printed as frames: stdout stays valid JSON lines
        where = f"entry {seq}" if seq is not None else "an entry"
        stderr.write(f"{PROG}: warning: skipped {where} of {stream_key}: {problem}\n")
    oldest_seq = _entry_seq(oldest[0][0]) if oldest else None
    top_seq = meta.seq if meta is not None else 0
    header = {
        "project_id": args.project_id,
        "epoch": meta.epoch if meta is not None else None,
        "seq": top_seq,
        "oldest": oldest_seq,
        "after": args.after,
        "count": len(frames),
        "more": more,
        # Events after the cursor that retention already dropped: a gateway would answer this
        # cursor with resync_required (history_trimmed).
        "trimmed": args.after < top_seq and (oldest_seq is None or oldest_seq > args.after + 1),
    }
    stdout.write(msgspec.json.encode(header).decode() + "\n")
    for _seq, frame in frames:
        stdout.write(frame.decode() + "\n")
    return EXIT_OK


def _history_reply_shaped(reply: object) -> bool:
    """``reply`` has the shape of the HISTORY script's: ``[[epoch, seq], oldest, entries]``,
    ``oldest`` empty or one ``[id, fields]`` entry (the entries are parsed one by one)."""
    if not (isinstance(reply, list) and len(reply) == 3):
        return False
    meta, oldest, entries = reply
    return (
        isinstance(meta, list)
        and len(meta) == 2
        and isinstance(oldest, list)
        and all(isinstance(entry, list) and entry for entry in oldest)
        and isinstance(entries, list)
    )


def _entry_seq(entry_id: bytes | str) -> int | None:
    try:
        return stream_entry_seq(entry_id)
    except ValueError:  # a foreign id ("5-1" parses; "x-0", 5 do not)
        return None


# --- token ------------------------------------------------------------------------------------


def _token(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    if not args.secret:
        raise CliError("a secret is required: --secret or $EVENTBUS_AUTH_SECRET")
    projects = "*" if args.all_projects else args.projects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            token = issue_token(args.secret, projects, ttl=args.ttl, subject=args.subject)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    for warning in caught:  # e.g. PyJWT's InsecureKeyLengthWarning for a short secret
        stderr.write(f"{PROG}: warning: {warning.message}\n")
    stdout.write(token + "\n")
    return EXIT_OK


# --- revoke-tokens ------------------------------------------------------------------------------


def _revoke_tokens(args: argparse.Namespace, stdout: TextIO) -> int:
    with _publisher(args, max_revocations=args.max_revocations) as publisher:
        try:
            revocation = publisher.revoke_tokens(
                args.subject, issued_before=args.issued_before, keep_for=args.keep_for
            )
        except ValueError as exc:  # raised before any I/O
            raise CliError(str(exc)) from None
        except RevocationListFull as exc:
            raise CliError(str(exc), EXIT_REVOCATIONS_FULL) from None
    stdout.write(msgspec.json.encode(revocation).decode() + "\n")
    return EXIT_OK


# --- entry point ------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit code (``sys.exit(main())``)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegated_command(argv)
    if delegated is not None:
        command, rest = delegated
        return _delegate(command, rest, stdout, stderr)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "publish":
            return _publish(args, stdin, stdout)
        if args.command == "history":
            return _history(args, stdout, stderr)
        if args.command == "presence":
            return _presence(args, stdout)
        if args.command == "revoke-tokens":
            return _revoke_tokens(args, stdout)
        return _token(args, stdout, stderr)
    except CliError as exc:
        stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:
        # `eventbus-publish history 1 | head`: the reader left; not an error worth a traceback.
        # (Before the OSError clause below: redis-py wraps its own socket errors, so a bare
        # BrokenPipeError can only come from our stdout.) Point stdout at /dev/null so that the
        # interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (PublisherUnavailable, *_REDIS_DOWN) as exc:
        stderr.write(f"{PROG}: error: Redis unavailable at {_safe_url(args)}: {_reason(exc)}\n")
        return EXIT_UNAVAILABLE
    except (PublishError, redis.exceptions.RedisError) as exc:
        stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_REDIS_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


#: Subcommands that are programs of their own, each with its own options and exit codes.
_DELEGATED = {
    "tail": "print a project's events live, through a gateway (docs/consumer.md)",
    "relay": "publish an outbox table to Redis (docs/outbox.md)",
    "http-api": "serve the HTTP publish API, make an API key, or print its OpenAPI document "
    "(docs/http-publish.md)",
}


def _delegated_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(command, its arguments)`` when the subcommand is a delegated program. Its arguments
    are passed untouched (argparse would take ``--help`` after it for its own). Connection
    options given before it are passed on after it."""
    before: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("--redis-url", "--prefix") and index + 1 < len(argv):
            before += argv[index : index + 2]
            index += 2
        elif arg.startswith(("--redis-url=", "--prefix=")):
            before.append(arg)
            index += 1
        elif arg in _DELEGATED:
            rest = argv[index + 1 :]
            # tail talks to a gateway, not to Redis: it takes no connection options.
            return arg, rest if arg == "tail" else [*rest, *before]
        else:
            return None
    return None


def _delegate(command: str, argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    prog = f"{PROG} {command}"
    if command == "tail":
        # The command line composes the packages: the library itself never imports the consumer.
        from consumer.tail import main as tail_main

        return tail_main(argv, prog=prog, stdout=stdout, stderr=stderr)
    if command == "relay":
        from publisher.outbox.cli import relay_main

        return relay_main(argv, prog=prog)
    from publisher.http_api.__main__ import main as http_api_main

    return http_api_main(argv, prog=prog)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, PublisherUnavailable) and exc.__cause__ else exc
    return str(cause) or type(cause).__name__


def _safe_url(args: argparse.Namespace) -> str:
    # Never print a password from the URL.
    from urllib.parse import urlsplit

    parts = urlsplit(getattr(args, "redis_url", "") or "")
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return parts.geturl()


if __name__ == "__main__":
    sys.exit(main())
