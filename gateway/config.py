"""The gateway's configuration: one Struct, filled from ``EVENTBUS_*`` variables and CLI flags.

Every field is both a flag (``--max-connections``) and an environment variable
(``EVENTBUS_MAX_CONNECTIONS``); flags win. ``python -m gateway --help`` lists them all, and the
README's table is generated from the same descriptions.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta

from gateway.workers import HEARTBEAT_INTERVAL
from schemas.history import DEFAULT_PAGE_BYTES, MAX_PAGE_BYTES
from schemas.presence import DEFAULT_MAX_ANNOUNCEMENT, MAX_ANNOUNCEMENT_LIMIT, MAX_TTL_MS
from schemas.tokens import TokenVerifier
from serverkit.logs import LogLevel

__all__ = ["ConfigError", "GatewayConfig", "load_config"]

ENV_PREFIX = "EVENTBUS_"

#: The largest ``--poll-page-bytes``: eventbus.js gives up on a poll answer longer than 4 Mi
#: characters (``EventBus.MAX_POLL_LENGTH``), and a page's answer adds to its events' bytes a
#: comma per event and its own fields (about 1 KiB at 1,000 events); 64 KiB leaves room.
POLL_PAGE_BYTES_MAX = MAX_PAGE_BYTES  # (schemas.history: the publisher's HTTP API pages alike)


def _doc(text: str, *, any_case: bool = False, **constraints: Any) -> Meta:
    """A setting's description and constraints; ``any_case``: its value is taken in any case
    from the flag and the variable (lower-cased before it is checked)."""
    return Meta(description=text, extra={"any_case": True} if any_case else None, **constraints)


class GatewayConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Settings of one gateway process."""

    redis_url: Annotated[
        str, _doc("Redis URL: redis://, rediss://, unix:// or redis+cluster://host:port.")
    ] = "redis://127.0.0.1:6379/0"
    host: Annotated[str, _doc("Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, _doc("Port to listen on (WebSocket and HTTP).", ge=0, le=65535)] = 8765
    auth_secret: Annotated[str | None, _doc("HS256 secret that verifies browser tokens.")] = None
    no_auth: Annotated[
        bool, _doc("Development mode: accept every connection and project without a token.")
    ] = False
    allowed_origins: Annotated[
        list[str],
        _doc(
            "Comma-separated Origin allowlist for handshakes (empty: any origin); requests "
            "without Origin (not browsers) are not checked."
        ),
    ] = []
    prefix: Annotated[str, _doc("Redis key prefix, shared with the publishers.")] = "eventbus"
    sharded_pubsub: Annotated[
        bool | None,
        _doc("Use SSUBSCRIBE (sharded pub/sub). Default: on for redis+cluster:// URLs."),
    ] = None
    max_connections: Annotated[
        int,
        _doc(
            "Sockets per process, counted from accept to close (WebSocket, handshakes, HTTP); "
            "past it, handshakes, streams and polls get 503.",
            ge=1,
        ),
    ] = 20_000
    max_subscriptions: Annotated[int, _doc("Projects per connection.", ge=1)] = 100
    client_rate: Annotated[
        float,
        _doc(
            "Frames per second a connection may send after auth, sustained (a token bucket; "
            "over it a frame gets error rate_limited; 0: no limit).",
            ge=0,
        ),
    ] = 20.0
    client_burst: Annotated[
        int,
        _doc(
            "Frames a connection may send at once (the bucket's size): at least twice "
            "--max-subscriptions, so that a reconnect (a subscribe and an activity per "
            "project) is never throttled.",
            ge=1,
        ),
    ] = 200
    max_frame_bytes: Annotated[int, _doc("Largest client frame accepted.", ge=256)] = 65_536
    max_request_bytes: Annotated[
        int,
        _doc(
            "Bytes a request's head (request line and headers: a handshake, a stream, a poll) "
            "may take in all; past it the request gets 431 and its socket is closed (from 8192 "
            "to 1048576).",
            ge=8192,
            le=1_048_576,
        ),
    ] = 32_768
    max_replay: Annotated[
        int, _doc("Most events replayed on one resume; further behind gets a resync.", ge=1)
    ] = 1_000
    poll_page_bytes: Annotated[
        int,
        _doc(
            "Bytes of stored events one poll page carries at most (a single larger event is "
            "still a page; the rest is paged on with 'more'); from 1 KiB to 4 MiB less 64 KiB, "
            "so that a full page stays within eventbus.js's 4 MiB poll answer.",
            ge=1024,
            le=POLL_PAGE_BYTES_MAX,
        ),
    ] = DEFAULT_PAGE_BYTES
    resume_window_events: Annotated[
        int,
        _doc(
            "Recent events each followed project keeps in memory to answer resumes without a "
            "Redis read (0: off).",
            ge=0,
        ),
    ] = 1_000
    resume_window_bytes: Annotated[
        int,
        _doc("Bytes all resume windows of the process may hold together.", ge=0),
    ] = 64 * 1024 * 1024
    outbound_limit: Annotated[
        int,
        _doc(
            "Bytes waiting in a connection's write buffer before it is cut as a slow consumer.",
            ge=1024,
        ),
    ] = 1_048_576
    stall_timeout: Annotated[
        float, _doc("Seconds a non-empty write buffer may stay undrained before disconnect.", gt=0)
    ] = 30.0
    answer_min_rate: Annotated[
        int,
        _doc(
            "Bytes per second an HTTP answer (a poll page, eventbus.js) must be read at on "
            "average: it has 5 s plus its size at this rate to be sent, then the socket is "
            "dropped (at least 1024).",
            ge=1024,
        ),
    ] = 16_384
    auth_timeout: Annotated[float, _doc("Seconds to wait for the first auth frame.", gt=0)] = 10.0
    ping_interval: Annotated[float, _doc("WebSocket keepalive ping interval (s).", gt=0)] = 20.0
    ping_timeout: Annotated[
        float,
        _doc(
            "Keepalive pong timeout (s); on SSE streams, how long written bytes may stay "
            "unacknowledged (TCP_USER_TIMEOUT, Linux).",
            gt=0,
        ),
    ] = 20.0
    sse_keepalive_interval: Annotated[
        float, _doc("Seconds between keepalive comments on an idle SSE stream.", gt=0)
    ] = 15.0
    compression: Annotated[
        bool, _doc("Negotiate permessage-deflate (costs memory and CPU per connection).")
    ] = False
    reconcile_interval: Annotated[
        float, _doc("Seconds between checks of every active project's top sequence.", gt=0)
    ] = 2.0
    probe_interval: Annotated[
        float, _doc("Seconds between pings on the pub/sub connection.", gt=0)
    ] = 5.0
    probe_timeout: Annotated[
        float,
        _doc(
            "Seconds a pub/sub ping may take (up to 6 times that while a backlog of messages"
            " is read).",
            gt=0,
        ),
    ] = 5.0
    subscribe_timeout: Annotated[
        float, _doc("Seconds a subscribe may wait for Redis before an 'unavailable' error.", gt=0)
    ] = 5.0
    presence_ttl: Annotated[
        float,
        _doc(
            "Seconds a pod's presence records outlive its last refresh (a SIGKILLed pod's "
            "members are gone within ttl + 3 refreshes + 1 diff interval; at most 600).",
            gt=0,
        ),
    ] = 10.0
    presence_refresh_interval: Annotated[
        float,
        _doc("Seconds between a pod's presence refreshes (less than half the ttl).", gt=0),
    ] = 3.0
    presence_diff_interval: Annotated[
        float,
        _doc("Seconds between presence_diff messages of a project to one connection.", gt=0),
    ] = 1.0
    presence_drain_grace: Annotated[
        float,
        _doc(
            "Seconds a draining pod keeps its members present, so clients that reconnect "
            "elsewhere in time never appear to leave (at most 600).",
            ge=0,
        ),
    ] = 15.0
    presence_max_members: Annotated[
        int,
        _doc(
            "Members listed per project: further people read presence but are not listed "
            "(bounds the size of presence messages).",
            ge=1,
        ),
    ] = 1_000
    presence_max_announcement: Annotated[
        int,
        _doc(
            "Bytes of member records one presence write announces to the other pods at most "
            "(at most 4 MiB); a larger write is announced without them and the pods read the "
            "project from Redis instead (Redis closes a pub/sub connection it has queued 32 MB "
            "for, or 8 MB for 60 s, by default).",
            ge=0,
            le=MAX_ANNOUNCEMENT_LIMIT,
        ),
    ] = DEFAULT_MAX_ANNOUNCEMENT
    revocation_poll_interval: Annotated[
        float,
        _doc(
            "Seconds between reads of the token revocation list's version in Redis: a revoked "
            "token is refused, and its open connections closed (4003), within about this long "
            "(0: revocations are not read nor checked; at most 3600).",
            ge=0,
            le=3600,
        ),
    ] = 1.0
    drain_delay: Annotated[
        float,
        _doc(
            "Seconds to keep answering (readiness 503, new clients and polls refused) after "
            "SIGTERM before closing clients, so load balancers stop routing here first.",
            ge=0,
        ),
    ] = 0.0
    drain_timeout: Annotated[
        float,
        _doc(
            "Seconds to close every client, and answer the polls under way, after SIGTERM "
            "before exiting.",
            gt=0,
        ),
    ] = 20.0
    drain_batch: Annotated[int, _doc("Clients closed per batch while draining.", ge=1)] = 500
    workers: Annotated[
        str,
        _doc(
            "Gateway processes sharing the port (SO_REUSEPORT), supervised by this one: "
            "a number, or 'auto' for one per usable core.",
            pattern=r"^(auto|[1-9][0-9]{0,3})$",
        ),
    ] = "1"
    worker_timeout: Annotated[
        float,
        _doc(
            "With --workers: seconds a worker's event loop may go without a heartbeat (one a "
            "second) before the supervisor kills it (SIGKILL) and starts another; 0: never.",
            ge=0,
        ),
    ] = 30.0
    loop: Annotated[
        Literal["asyncio", "uvloop"],
        _doc(
            "Event loop: asyncio (the standard library's), or uvloop (libuv's: less CPU per "
            "reconnect and less memory per connection, somewhat fewer deliveries/s)."
        ),
    ] = "asyncio"
    log_format: Annotated[
        Literal["auto", "json", "console"],
        _doc("Log format; auto = console on a terminal, JSON otherwise."),
    ] = "auto"
    log_level: Annotated[
        LogLevel,
        _doc("Minimum log level, in any case (INFO as well as info).", any_case=True),
    ] = "info"

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                # "inf" parses as a float and passes every bound: a --drain-timeout or
                # --worker-timeout of inf waits for ever, which no setting may mean (0 is "off"
                # where a setting has an off).
                flag = f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}"
                raise ConfigError(f"{flag}: expected a finite number, got {value}")
        if not self.no_auth and not self.auth_secret:
            raise ConfigError(
                "an auth secret is required: set --auth-secret / EVENTBUS_AUTH_SECRET, "
                "or run the development mode with --no-auth"
            )
        if not self.no_auth:
            assert self.auth_secret is not None
            try:
                TokenVerifier(self.auth_secret)
            except ValueError as exc:  # a PEM, SSH or DER key, a JWK: every token refused
                raise ConfigError(f"--auth-secret / EVENTBUS_AUTH_SECRET: {exc}") from None
        try:
            _check_redis_url(self.redis_url)
        except ValueError as exc:
            # Found only once connecting before: a traceback, and in a --workers group every
            # worker crashing at its start, restarted for good, the supervisor never exiting.
            raise ConfigError(f"--redis-url / EVENTBUS_REDIS_URL: {exc}") from None
        if 0 < self.worker_timeout < 2 * HEARTBEAT_INTERVAL:
            raise ConfigError(
                f"--worker-timeout must be 0 (off) or at least {2 * HEARTBEAT_INTERVAL:g} s: "
                "workers send a heartbeat every second, and one late beat must not kill a worker"
            )
        if self.client_rate and self.client_burst < 2 * self.max_subscriptions:
            # eventbus.js answers a refused frame of a project with a resubscribe (and then the
            # activity again): activities refused at a reconnect snowball into 4029.
            raise ConfigError(
                "--client-burst must be at least twice --max-subscriptions: a reconnect "
                "subscribes to every project at once and eventbus.js then sends an activity in "
                "each, and a reconnect must never be refused (nor closed)"
            )
        for flag, seconds in (
            ("--presence-ttl", self.presence_ttl),
            ("--presence-drain-grace", self.presence_drain_grace),
        ):
            if round(seconds * 1000) > MAX_TTL_MS:
                raise ConfigError(
                    f"{flag} may be at most {MAX_TTL_MS // 1000} s: Redis takes a pod whose "
                    "presence deadline is further ahead for garbage (another writer's), and the "
                    "pod for dead"
                )
        if not self.presence_refresh_interval * 2 < self.presence_ttl:
            raise ConfigError(
                "--presence-ttl must exceed two --presence-refresh-interval: one late refresh "
                "must not expire a live pod's members"
            )

    @property
    def sharded(self) -> bool:
        if self.sharded_pubsub is not None:
            return self.sharded_pubsub
        return self.redis_url.split("://", 1)[0].endswith("+cluster")


class ConfigError(ValueError):
    """Invalid configuration; the message says which setting and why."""


def _fields() -> list[tuple[str, Any, str, Any]]:
    info = msgspec.inspect.type_info(GatewayConfig)
    all_hints = get_type_hints(GatewayConfig, include_extras=True)
    out = []
    for field in info.fields:
        hints = all_hints[field.name]
        description = ""
        for meta in get_args(hints)[1:] if get_origin(hints) is Annotated else ():
            if isinstance(meta, Meta) and meta.description:
                description = meta.description
        default = field.default
        if default is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        out.append((field.name, field.type, description, default))
    return out


def _unwrap(tp: Any) -> Any:
    while isinstance(tp, msgspec.inspect.Metadata):
        tp = tp.type
    return tp


def _is_bool(tp: Any) -> bool:
    tp = _unwrap(tp)
    return isinstance(tp, msgspec.inspect.BoolType) or (
        isinstance(tp, msgspec.inspect.UnionType)
        and any(isinstance(t, msgspec.inspect.BoolType) for t in tp.types)
    )


def _is_list(tp: Any) -> bool:
    return isinstance(_unwrap(tp), msgspec.inspect.ListType)


def _takes_any_case(tp: Any) -> bool:
    while isinstance(tp, msgspec.inspect.Metadata):
        if (tp.extra or {}).get("any_case"):
            return True
        tp = tp.type
    return False


def _parse_env_value(tp: Any, raw: str) -> Any:
    if _takes_any_case(tp):
        return raw.lower()
    if _is_bool(tp):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"expected a boolean, got {raw!r}")
    if _is_list(tp):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _check_redis_url(url: str) -> None:
    """Raise ValueError (whose message shows no part of the URL's password) unless redis-py can
    parse ``url`` as redisconn passes it on (a cluster URL rebuilt without its ``+cluster``, as
    redisconn does it), and a cluster over TCP (redis-py has no Unix socket cluster).

    redis-py's own messages never repeat the URL, but urllib's do repeat what it read as the
    port or the netloc: a password holding an unencoded ``/``, ``?`` or ``#`` (a base64 one) is
    cut there, and its first part was printed as the port. A message holding any piece of the
    URL's user information is replaced by a hint."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    from redisconn import is_cluster_url, plain_url

    rest = url.partition("://")[2]
    try:  # (urlsplit raises the same as redis-py's parse: its messages too)
        cluster = is_cluster_url(url)
        if cluster and urlsplit(url).scheme == "unix+cluster":
            raise ValueError(
                "a Redis Cluster is reached over TCP: redis+cluster:// or rediss+cluster://"
            )
        parse_url(plain_url(url) if cluster else url)
    except ValueError as exc:
        userinfo = rest.rpartition("@")[0]  # (up to the last "@": a password's own "/" too)
        pieces = [userinfo, *re.split(r"[:/?#@\[\]]", userinfo)]
        if any(piece and piece in str(exc) for piece in pieces):
            raise ValueError(
                "not a URL redis-py can parse (the reason is left out: it would show part of "
                "the password); a password's '/', '?', '#' and '%' must be percent-encoded "
                "(%2F, %3F, %23, %25)"
            ) from None
        raise


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Build the config from the environment, then the command line (flags win)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, tp, _, _ in _fields():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            try:
                values[name] = _parse_env_value(tp, environ[env_name])
            except ConfigError as exc:
                raise ConfigError(f"{env_name}: {exc}") from None

    # The name the user typed: the console script, or the module form.
    invoked_as_module = sys.argv[0].endswith("__main__.py")
    parser = argparse.ArgumentParser(
        prog="python -m gateway" if invoked_as_module else "eventbus-gateway",
        description="The event bus gateway: relays each project's events from Redis to browsers.",
    )
    for name, tp, description, default in _fields():
        flag = "--" + name.replace("_", "-")
        help_text = f"{description} [env {ENV_PREFIX}{name.upper()}; default {default!r}]"
        if _is_bool(tp):
            # store_const rather than BooleanOptionalAction, which reads "--no-auth" as False.
            parser.add_argument(
                flag, dest=name, action="store_const", const=True, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text, metavar="VALUE")
    args = parser.parse_args(argv)
    for name, tp, _, _ in _fields():
        value = getattr(args, name)
        if value is not None:
            values[name] = value if _is_bool(tp) else _parse_env_value(tp, value)
    try:
        return msgspec.convert(values, GatewayConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_name_setting(str(exc))}") from None


def _name_setting(message: str) -> str:
    """msgspec's message about a field (``Expected `int` >= 1 - at `$.max_connections` ``)
    named by what the user set, the flag or the variable: ``--max-connections /
    EVENTBUS_MAX_CONNECTIONS: Expected `int` >= 1``."""
    head, sep, where = message.rpartition(" - at `$.")
    name = where.removesuffix("`")
    if not sep or not name.isidentifier():
        return message
    return f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}: {head}"


def markdown_table() -> str:
    """The configuration reference as a Markdown table (it is pasted into the README)."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, _, description, default in _fields():
        shown = ",".join(default) if isinstance(default, list) else default
        shown = "" if shown is None else shown
        rows.append(
            f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` | `{shown}` "
            f"| {description} |"
        )
    return "\n".join(rows)
