"""The HTTP publish API as an ASGI application (served by uvicorn, see ``__main__``).

``POST /v1/projects/{id}/events`` publishes one event or a JSON array of events of that project
through :class:`publisher.AsyncPublisher`, so an HTTP publish is exactly a library publish: the
same validation, the same atomic Lua script, the same idempotency keys. ``POST /v1/revocations``
is ``AsyncPublisher.revoke_tokens``, for the keys allowed to revoke. ``GET
/v1/projects/{id}/presence`` and ``GET /v1/projects/{id}/events`` read a project's presence and a
page of its history (``AsyncPublisher.presence``, ``AsyncPublisher.history``: the gateway's
``presence`` message and poll answer), for the keys that may publish to it. ``GET /healthz`` and
``GET /readyz`` serve probes, ``GET /openapi.json`` the API's OpenAPI document
(:mod:`publisher.http_api.openapi`). Everything the API decides is in
:mod:`publisher.http_api.core`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from redis.asyncio.cluster import RedisCluster

from publisher.client import DEFAULT_TIMEOUT
from publisher.connection import idle_limit
from publisher.core import (
    BATCH_SIZE,
    IdempotencyConflict,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    RevocationListFull,
)
from publisher.http_api import openapi
from publisher.http_api.bodies import KEY_SHARE, BodyHold, BodyMemory
from publisher.http_api.core import (
    MAX_REVOCATION_BODY,
    OPENAPI_PATH,
    PRESENCE,
    REFUSED_SCOPE_KEY,
    REVOCATIONS_PATH,
    ApiError,
    ApiKey,
    Credentials,
    Health,
    RateLimiter,
    Readiness,
    cursor_body,
    error_body,
    header,
    history_body,
    parse_events,
    parse_history_query,
    parse_presence_query,
    parse_revocation,
    parse_route,
    presence_body,
    revocation_body,
)
from redisconn.node_limits import NodeLimits, node_unanswered
from schemas.events import ProjectEvent
from schemas.history import DEFAULT_PAGE_BYTES, MAX_PAGE_BYTES
from schemas.keys import Keys
from schemas.presence import DEFAULT_MAX_MEMBERS
from serverkit import LogThrottle, SingleFlight

__all__ = ["HttpApiSettings", "PublishApi"]

log = structlog.get_logger("eventbus.http_api")

_IDEMPOTENCY_HEADER_MAX = 100
#: A read answers HEAD as GET; the server (uvicorn) leaves the body out.
_READ_METHODS = ("GET", "HEAD")
#: The probes: reads like the others, so another method is a 405 (it was a 404 ``not_found``).
_PROBES = ("/healthz", "/readyz")
_PUBLISHER_KEY_MAX = 200  # publisher.core: idempotency keys of 1-200 printable characters
_JSON = [(b"content-type", b"application/json")]
_UNAVAILABLE_LOG_INTERVAL = 1.0  # seconds between "Redis unavailable" warnings
_UNAVAILABLE = "unavailable"  # the throttle's key for those warnings
_T = TypeVar("_T")
_FULL = "revocation_list_full"  # the throttle's key for the full-list warnings
#: redis-py's pool size when the client does not say (its default).
_DEFAULT_POOL = 100
_HEALTHY = msgspec.json.encode(Health())
_READY = msgspec.json.encode(Readiness(ready=True))


class HttpApiSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Limits of the HTTP publish API (each is a flag of ``eventbus-publish http-api``)."""

    max_body: int = 4 * 1024 * 1024
    """Largest request body in bytes (413 above it)."""
    max_body_memory: int = 128 * 1024 * 1024
    """Bytes of request bodies held at once, all requests together (503 ``overloaded`` past
    it); one key's at most a quarter of it (:mod:`publisher.http_api.bodies`). At least four
    times ``max_body``."""
    max_events: int = 500
    """Most events in one request (one atomic script call in Redis)."""
    rate: float = 5000.0
    """Default events/s per API key (a key's own ``rate`` in the keys file wins)."""
    burst: int = 10000
    """Default burst per API key, in events."""
    body_timeout: float = 10.0
    """Seconds to receive a whole request body (408 after it)."""
    header_timeout: float = 10.0
    """Seconds to receive a request's headers, from the connection's start or the previous
    answer; the connection is closed after it (``publisher.http_api.server``)."""
    ready_timeout: float = 1.0
    """Seconds ``/readyz`` waits for Redis' answer to PING."""
    send_timeout: float = 10.0
    """Seconds an answer may wait for the client to read it; the connection is dropped after it
    (``publisher.http_api.server``)."""
    max_header_bytes: int = 32 * 1024
    """Largest request line and headers in bytes (431 above it, ``publisher.http_api.server``)."""
    presence_max_members: int = DEFAULT_MAX_MEMBERS
    """The gateways' ``--presence-max-members``, for ``GET .../presence`` (a pod listing more than
    a read of this many takes is another writer's, left out whole: ``publisher.presence``)."""
    history_page_bytes: int = DEFAULT_PAGE_BYTES
    """Bytes of stored events one ``GET .../events`` page carries at most (a single larger event
    is still a page; the rest is paged on with ``more``), as the gateways' ``--poll-page-bytes``;
    from 1024 to 4 MiB less 64 KiB."""

    def __post_init__(self) -> None:
        # Refused here, with the flag's name, instead of failing request by request: --rate 0
        # divided by zero once a key's burst was spent (a bare 500 for every request of it), and
        # --max-events above the publisher's script-call batch split an array without a key
        # into several calls, no longer all or nothing as documented.
        if not 1 <= self.max_events <= BATCH_SIZE:
            raise ValueError(f"--max-events must be from 1 to {BATCH_SIZE} (one script call)")
        if self.max_body < 1 or self.burst < 1:
            raise ValueError("--max-body and --burst must be at least 1")
        if self.max_body_memory < KEY_SHARE * self.max_body:
            raise ValueError(
                f"--max-body-memory must be at least {KEY_SHARE} x --max-body "
                f"({KEY_SHARE * self.max_body}): one key holds at most a {KEY_SHARE}th of it"
            )
        if self.max_header_bytes < 1024:
            raise ValueError("--max-header-bytes must be at least 1024")
        if self.presence_max_members < 1:
            raise ValueError("--presence-max-members must be at least 1")
        if not 1024 <= self.history_page_bytes <= MAX_PAGE_BYTES:
            raise ValueError(f"--history-page-bytes must be from 1024 to {MAX_PAGE_BYTES}")
        for name in ("rate", "body_timeout", "header_timeout", "send_timeout", "ready_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number")


class Counters:
    """Outcomes by status code (``/metrics`` renders them for Prometheus)."""

    def __init__(self) -> None:
        self.responses: dict[tuple[int, str], int] = {}
        self.events = 0
        #: Connections the server closed without an answer, by reason (``server``): "full" (past
        #: --limit-concurrency and its slack, at accept), "header_timeout" (--header-timeout),
        #: "send_timeout" (an answer not read within --send-timeout).
        self.closed: dict[str, int] = {"full": 0, "header_timeout": 0, "send_timeout": 0}

    def count(self, status: int, code: str) -> None:
        self.responses[status, code] = self.responses.get((status, code), 0) + 1

    def render(self, foreign_entries: int = 0, body_bytes: int = 0) -> bytes:
        """``foreign_entries``: stream entries the publisher's history reads skipped;
        ``body_bytes``: bytes of request bodies held now (``--max-body-memory``)."""
        lines = [
            "# HELP eventbus_http_publish_events_total Events published through the HTTP API.",
            "# TYPE eventbus_http_publish_events_total counter",
            f"eventbus_http_publish_events_total {self.events}",
            "# HELP eventbus_http_publish_responses_total HTTP API answers by status and code.",
            "# TYPE eventbus_http_publish_responses_total counter",
        ]
        for (status, code), value in sorted(self.responses.items()):
            lines.append(
                f'eventbus_http_publish_responses_total{{status="{status}",code="{code}"}} {value}'
            )
        lines += [
            "# HELP eventbus_http_publish_connections_closed_total Connections closed without an"
            " answer.",
            "# TYPE eventbus_http_publish_connections_closed_total counter",
        ]
        for reason, value in sorted(self.closed.items()):
            labels = f'{{reason="{reason}"}}'
            lines.append(f"eventbus_http_publish_connections_closed_total{labels} {value}")
        lines += [
            "# HELP eventbus_http_publish_body_bytes Bytes of request bodies held now"
            " (--max-body-memory).",
            "# TYPE eventbus_http_publish_body_bytes gauge",
            f"eventbus_http_publish_body_bytes {body_bytes}",
        ]
        lines += [
            "# HELP eventbus_foreign_values_total Values in Redis the event bus cannot have"
            " written, skipped.",
            "# TYPE eventbus_foreign_values_total counter",
            f'eventbus_foreign_values_total{{kind="stream_entry"}} {foreign_entries}',
        ]
        return ("\n".join(lines) + "\n").encode()


class PublishApi:
    """ASGI application. ``publisher`` is an :class:`publisher.AsyncPublisher` (or anything with
    its ``publish``/``publish_many``/``revoke_tokens`` coroutines and a ``client`` answering
    ``ping``)."""

    def __init__(
        self,
        publisher: Any,
        credentials: Credentials,
        settings: HttpApiSettings | None = None,
        *,
        clock=time.monotonic,
    ) -> None:
        self.publisher = publisher
        self.credentials = credentials
        self.settings = settings or HttpApiSettings()
        self.limiter = RateLimiter(self.settings.rate, self.settings.burst)
        self.counters = Counters()
        #: The bytes of request bodies held now (``--max-body-memory``).
        self.bodies = BodyMemory(self.settings.max_body_memory)
        self._clock = clock
        # The unavailable warning: one a second, with how many were not logged since.
        self._log_throttle = LogThrottle(interval=_UNAVAILABLE_LOG_INTERVAL, burst=1, clock=clock)
        #: The readiness ``PING`` in flight, shared by every ``/readyz`` made meanwhile.
        self._ping = SingleFlight(self._ping_redis)
        #: The OpenAPI document of this app's settings (``GET /openapi.json``), once asked for.
        self._openapi: bytes | None = None
        client = getattr(publisher, "client", None)
        #: The places of the Redis calls in flight (per Cluster master): see :func:`redis_places`.
        self._places = NodeLimits(client, redis_places(client))
        self._keys: Keys = getattr(publisher, "keys", None) or Keys()
        self._redis_timeout: float = getattr(publisher, "timeout", DEFAULT_TIMEOUT)

    async def __call__(self, scope: dict, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.publisher.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive, send) -> None:
        # Routed as sent: ``path`` is percent-decoded, so ``/v1/projects/1%2Fpresence`` would be
        # the same resource as ``/v1/projects/1/presence``, and a proxy that allows or refuses by
        # path would be passed by the other spelling. No route of ours needs an escape.
        method, path = scope["method"], _sent_path(scope)
        allow = b"POST"  # the methods of the path, for a 405's Allow
        try:
            if path in _PROBES:
                allow = b"GET, HEAD"
                if method not in _READ_METHODS:
                    raise ApiError(405, "method_not_allowed", "use GET")
                if path == "/healthz":
                    await _respond(send, 200, _HEALTHY)
                else:
                    await self._readyz(send)
                return
            if path == OPENAPI_PATH:
                allow = b"GET, HEAD"
                if method not in _READ_METHODS:
                    raise ApiError(405, "method_not_allowed", "use GET")
                if self._openapi is None:  # built once, on the first request for it
                    self._openapi = openapi.openapi_json(self.settings)
                await _respond(send, 200, self._openapi)
                return
            if path == "/metrics":
                allow = b"GET, HEAD"
                if method not in _READ_METHODS:
                    raise ApiError(405, "method_not_allowed", "use GET")
                body = self.counters.render(
                    getattr(self.publisher, "foreign_entries_skipped", 0), self.bodies.held
                )
                await _respond(send, 200, body, content_type=b"text/plain")
                return
            if path == REVOCATIONS_PATH:
                if method != "POST":
                    raise ApiError(405, "method_not_allowed", "use POST")
                status, body = await self._revoke(scope, receive)
                self._count(scope, status, "ok")
                await _respond(send, status, body)
                return
            project_id, resource = parse_route(path)
            if resource == PRESENCE:
                allow = b"GET, HEAD"
                if method not in _READ_METHODS:
                    raise ApiError(405, "method_not_allowed", "use GET")
                status, body = await self._presence(scope, project_id)
            elif method == "POST":
                status, body = await self._publish(scope, receive, project_id)
            elif method in _READ_METHODS:
                status, body = await self._history(scope, project_id)
            else:
                allow = b"GET, HEAD, POST"
                raise ApiError(405, "method_not_allowed", "use POST to publish, GET to read")
            self._count(scope, status, "ok")
            await _respond(send, status, body)
        except ApiError as error:
            self._count(scope, error.status, error.code)
            extra = []
            if error.retry_after is not None:
                extra.append((b"retry-after", b"%d" % max(1, math.ceil(error.retry_after))))
            if error.status == 405:
                extra.append((b"allow", allow))
            if error.code == "overloaded":  # (as the server's own: the client comes back later)
                extra.append((b"connection", b"close"))
            await _respond(send, error.status, error_body(error), extra)

    def _count(self, scope: dict, status: int, code: str) -> None:
        """Count an answer, unless the server answered the request itself (its refusal is
        counted there): a request whose body broke off was counted twice, the refusal's 400
        and this application's ``disconnected`` (or whatever it would have answered)."""
        if not scope.get(REFUSED_SCOPE_KEY):
            self.counters.count(status, code)

    async def _publish(self, scope: dict, receive, project_id: int) -> tuple[int, bytes]:
        headers = _headers(scope)
        key = self.credentials.authenticate(header(headers, b"authorization"))
        if not key.allows(project_id):
            raise ApiError(403, "forbidden", f"key {key.id!r} may not publish to {project_id}")
        _check_json(headers)
        idempotency_key = header(headers, b"idempotency-key")
        if idempotency_key is not None and not _valid_idempotency_key(idempotency_key):
            raise ApiError(
                400,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1-{_IDEMPOTENCY_HEADER_MAX} printable ASCII "
                "characters without spaces",
            )
        hold = self.bodies.hold(key.id)
        try:
            body = await self._body(headers, receive, hold)
            events, is_batch = parse_events(body, project_id, self.settings.max_events)
            del body  # (its events stay counted as the body until Redis has answered)
            return await self._publish_events(key, project_id, idempotency_key, events, is_batch)
        finally:
            hold.release()

    async def _publish_events(
        self,
        key: ApiKey,
        project_id: int,
        idempotency_key: str | None,
        events: list[ProjectEvent],
        is_batch: bool,
    ) -> tuple[int, bytes]:
        """Publish a request's parsed events (its key's rate limit taken first)."""
        self.limiter.take(key, len(events), self._clock())
        keys: list[str] | None = None
        if idempotency_key is not None:
            # One key per event: a retry of the same request publishes exactly what is
            # missing (each keyed event is its own script call).
            count = len(events) if is_batch else 1
            keys = _publisher_keys(key.id, idempotency_key, count, self.settings.max_events)

        async def call() -> list:
            if is_batch:
                return await self.publisher.publish_many(events, idempotency_keys=keys)
            only = None if keys is None else keys[0]
            return [await self.publisher.publish(events[0], idempotency_key=only)]

        try:
            cursors = await self._redis(self._keys.meta(project_id), call)
        except PublisherUnavailable as exc:
            raise self._unavailable(project_id, exc) from None
        except PublishError as exc:
            status, code = _publish_error_status(exc)
            cursors = None
            if isinstance(exc, PublishManyError) and any(c is not None for c in exc.cursors):
                cursors = exc.cursors  # some were written after all: say which
                self.counters.events += len(cursors) - len(exc.unpublished)
            raise ApiError(status, code, str(exc), cursors=cursors) from None
        self.counters.events += len(events)
        return 200, cursor_body(cursors, is_batch)

    def _reader(self, scope: dict, project_id: int) -> ApiKey:
        """The key of a read of ``project_id`` (its presence, its history); ApiError 401 or
        403. A key reads the projects it may publish to:
        a backend that may publish to a project already decides what its dashboards show, so
        reading who is there and what was published adds no trust; a key that publishes
        nowhere (a revoke-only key) reads nothing."""
        key = self.credentials.authenticate(header(_headers(scope), b"authorization"))
        if not key.allows(project_id):
            raise ApiError(
                403,
                "forbidden",
                f"key {key.id!r} may not read project {project_id} (a key reads the projects it "
                "may publish to)",
            )
        return key

    async def _presence(self, scope: dict, project_id: int) -> tuple[int, bytes]:
        """``GET /v1/projects/{id}/presence``: ``AsyncPublisher.presence``, as the gateway's
        ``presence`` message."""
        key = self._reader(scope, project_id)
        parse_presence_query(scope.get("query_string", b""))
        max_members = self.settings.presence_max_members
        members = await self._read(
            key, project_id, lambda: self.publisher.presence(project_id, max_members=max_members)
        )
        return 200, presence_body(project_id, members)

    async def _history(self, scope: dict, project_id: int) -> tuple[int, bytes]:
        """``GET /v1/projects/{id}/events?epoch=&after=&tag=&limit=``: ``AsyncPublisher.history``,
        a page as the gateway's poll answers it."""
        key = self._reader(scope, project_id)
        query = parse_history_query(scope.get("query_string", b""))
        page = await self._read(
            key,
            project_id,
            lambda: self.publisher.history(
                project_id,
                epoch=query.epoch,
                after=query.after,
                tag=query.tag,
                limit=query.limit,
                max_bytes=self.settings.history_page_bytes,
            ),
        )
        return 200, history_body(page)

    async def _read(self, key: ApiKey, project_id: int, read: Callable[[], Awaitable[_T]]) -> _T:
        """``read()`` of ``project_id`` for ``key``, charged one event of its rate limit (429
        past it, before Redis is asked); 503 when Redis does not answer, 502 ``read_failed``
        when the project's keys hold what the publisher cannot read."""
        self.limiter.take(key, 1, self._clock())
        try:
            return await self._redis(self._keys.meta(project_id), read)
        except PublisherUnavailable as exc:
            raise self._unavailable(project_id, exc) from None
        except PublishError as exc:
            raise ApiError(502, "read_failed", str(exc)) from None

    async def _revoke(self, scope: dict, receive) -> tuple[int, bytes]:
        """``POST /v1/revocations``: ``revoke_tokens`` for a key with ``revoke``; one
        revocation costs one event of the key's rate limit."""
        headers = _headers(scope)
        key: ApiKey = self.credentials.authenticate(header(headers, b"authorization"))
        if not key.revoke:
            raise ApiError(
                403,
                "forbidden",
                f"key {key.id!r} may not revoke tokens (make one with new-key --may-revoke)",
            )
        _check_json(headers)
        hold = self.bodies.hold(key.id)
        try:
            limit = min(self.settings.max_body, MAX_REVOCATION_BODY)
            request = parse_revocation(await self._body(headers, receive, hold, limit))
        finally:
            hold.release()  # (the request holds a subject of at most a few KiB from here)
        self.limiter.take(key, 1, self._clock())
        options: dict[str, int] = {}
        if request.issued_before is not None:
            options["issued_before"] = request.issued_before
        if request.keep_for is not None:
            options["keep_for"] = request.keep_for
        try:
            revocation = await self._redis(
                self._keys.revocations(),
                lambda: self.publisher.revoke_tokens(request.subject, **options),
            )
        except ValueError as exc:  # out of range: a time to come, a keep_for of years
            raise ApiError(422, "invalid_revocation", str(exc)) from None
        except PublisherUnavailable as exc:
            raise self._unavailable(None, exc) from None
        except RevocationListFull as exc:
            # 507 Insufficient Storage: the list has no room for the subject, not Redis failing
            # (502) nor the request's fault (4xx); no Retry-After: it takes an operator.
            self._log_full(key.id, exc)
            raise ApiError(507, "revocation_list_full", str(exc)) from None
        except PublishError as exc:
            raise ApiError(502, "revocation_failed", str(exc)) from None
        # Who revoked whose access, and until when: an operator's action, worth a line each.
        log.info(
            "tokens_revoked",
            key_id=key.id,
            subject=revocation.subject,
            issued_before=revocation.issued_before,
            expires_at=revocation.expires_at,
        )
        return 200, revocation_body(revocation)

    async def _redis(self, key: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, one publisher call about ``key``, once it has a place among the Redis
        calls in flight (:func:`redis_places`, per Cluster master); PublisherUnavailable when
        the wait and the call together take longer than the publisher's timeout.

        Every request in progress (``--limit-concurrency``, 1,000) made its call at once, each
        taking a connection of redis-py's pool (100), which refuses the next at once with "Too
        many connections": 400 history reads at once answered half of them 503 ``unavailable``,
        and ``/readyz`` not ready, against a healthy Redis. Now they wait their turn, within the
        same bound as the call itself, and a connection is always left to ``/readyz``."""
        try:
            async with asyncio.timeout(self._redis_timeout):
                async with self._places.for_key(key):
                    return await call()
        except TimeoutError as exc:  # the publisher turns its own into PublisherUnavailable
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._redis_timeout:g} s"
            ) from exc

    def _unavailable(self, project_id: int | None, exc: Exception) -> ApiError:
        """The 503 of a request Redis did not answer, logged at most once a second (with how
        many were not logged): one per request made an outage thousands of lines a second. The
        503s are counted, every one."""
        self._log_throttle.log(
            _UNAVAILABLE,
            log.warning,
            "http_publish_unavailable",
            project_id=project_id,
            error=str(exc),
        )
        return ApiError(503, "unavailable", "Redis is unavailable", retry_after=1)

    def _log_full(self, key_id: str, exc: RevocationListFull) -> None:
        """A full revocation list needs an operator: a warning, at most one a second (a leaked
        key or a runaway script may ask many times; the 507s are counted, every one)."""
        suppressed = self._log_throttle.allow(_FULL)
        if suppressed is None:
            return
        extra = {"suppressed": suppressed} if suppressed else {}
        log.warning(
            "revocation_list_full", key_id=key_id, entries=exc.entries, limit=exc.limit, **extra
        )

    async def _body(
        self,
        headers: dict[bytes, list[bytes]],
        receive,
        hold: BodyHold,
        limit: int | None = None,
    ) -> bytes:
        """The request body, of at most ``limit`` bytes (default ``max_body``; 413 above it),
        held in ``hold``: from its headers for its declared length, else as it arrives; 503
        ``overloaded`` when ``--max-body-memory`` (or the key's share of it) has no room."""
        limit = self.settings.max_body if limit is None else limit
        declared = header(headers, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid_header", "Content-Length is not a number")
            # Compared without int() of the whole: httptools passes any number of leading zeros
            # (the value fits its 64 bits), and int() refuses strings of over 4,300 digits with
            # ValueError, which was a bare 500.
            digits = declared.lstrip("0")
            if len(digits) > len(str(limit)) or int(digits or "0") > limit:
                raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes")
            if not hold.cover(int(digits or "0")):
                raise _no_room_for_bodies()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ApiError(400, "disconnected", "the client went away")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes")
                    if not hold.cover(size):
                        raise _no_room_for_bodies()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ApiError(408, "body_timeout", "the body did not arrive in time") from None
        return b"".join(chunks)

    async def _readyz(self, send) -> None:
        """200 when Redis answers a ``PING`` within ``ready_timeout``, else 503 with the reason.

        ``/readyz`` takes no key, so anyone who reaches the port may ask it at any rate: the
        probes made while a ``PING`` is in flight share it (a client that leaves does not cancel
        it for the others). A ``PING`` per probe held a connection of the publisher's pool
        (redis-py's, 100) each: 300 probes at once answered 503 "Too many connections" against
        a healthy Redis."""
        problem = await self._ping()
        if problem is not None:
            await _respond(send, 503, msgspec.json.encode(Readiness(ready=False, redis=problem)))
            return
        await _respond(send, 200, _READY)

    async def _ping_redis(self) -> str | None:
        """None when Redis answered in time, else what went wrong. On Redis Cluster, when a
        majority of its masters did, each asked on its own (as the gateway's ``/readyz``): a
        plain ``PING`` goes to one master (redis-py's default node), so that master hung made
        every API process unready at once, the other masters' projects with them, and another
        master hung left them ready."""
        client = self.publisher.client
        masters = client.get_primaries() if isinstance(client, RedisCluster) else []
        if not masters:
            return await self._ping_one(client, None)
        problems = await asyncio.gather(*(self._ping_one(client, node) for node in masters))
        failed = [problem for problem in problems if problem is not None]
        if 2 * len(failed) < len(masters):
            return None
        return f"{len(failed)} of {len(masters)} Redis Cluster masters: {failed[0]}"

    async def _ping_one(self, client: Any, node: Any) -> str | None:
        """None when ``client`` (``node``, if not None) answered PING within --ready-timeout."""
        try:
            async with asyncio.timeout(self.settings.ready_timeout):
                if node is None:
                    await client.ping()
                else:
                    await client.ping(target_nodes=node)
        except Exception as exc:  # any failure means "not ready"; the reason is in the body
            if isinstance(exc, TimeoutError) and node is not None:
                # Cut off by our bound, the PING's error is never seen by redis-py, which
                # reloads its slot map only after errors it sees: a master failed over to its
                # replica stayed in the map, asked (and unanswered) by every probe, and its
                # replica never was. Two such failovers, with no publish to make redis-py
                # see the hung node itself (none comes to an unready process), left every API
                # process unready for good against a cluster whose every slot was served.
                node_unanswered(client, node.name)
            return str(exc) or type(exc).__name__
        return None


def _no_room_for_bodies() -> ApiError:
    return ApiError(
        503,
        "overloaded",
        "the API holds as many request bodies as --max-body-memory allows: retry",
        retry_after=1,
    )


def redis_places(client: object) -> int:
    """How many Redis calls the API runs at once (per master on Redis Cluster): as many as
    ``client``'s connection pool (per node on Cluster; redis-py's 100 unless the URL sets
    ``max_connections``) holds besides the idle connections the publisher keeps
    (:func:`publisher.connection.idle_limit`) and one for ``/readyz``'s ``PING``: 49 of 100.
    The pool refuses a call past its size at once, however healthy Redis is."""
    pool = getattr(client, "connection_pool", None)
    size = getattr(pool, "max_connections", None)
    if size is None:  # Redis Cluster: each node's pool
        size = (getattr(client, "connection_kwargs", None) or {}).get("max_connections")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        size = _DEFAULT_POOL
    return max(1, size - idle_limit(pool) - 1)


def _headers(scope: dict) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


def _check_json(headers: dict[bytes, list[bytes]]) -> None:
    content_type = header(headers, b"content-type") or ""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")


def _valid_idempotency_key(value: str) -> bool:
    return 0 < len(value) <= _IDEMPOTENCY_HEADER_MAX and all("!" <= char <= "~" for char in value)


def _publisher_keys(key_id: str, idempotency_key: str, count: int, max_events: int) -> list[str]:
    """The publisher's idempotency keys of a request of ``count`` events (1 for a single
    event): ``http:<key id>:<Idempotency-Key>`` for the first, with ``:<index>`` after it for
    each further event of an array.

    A single event is the first of an array of one: a retry of it as an array (a client that
    sends what is pending as a batch), or of an array's first event alone, finds it. It had a
    key of its own beside the array's ``:0``, and both were published, each answered 200.

    Namespaced by credential, so two services choosing the same key never collide. A key id
    and an Idempotency-Key may each be 100 characters, which made keys longer than the
    publisher's 200: ``publish`` raised ValueError and the client got a bare 500. Such keys
    are replaced by a digest of the whole (``~`` never occurs in a key id, so the two forms
    cannot meet). Which form a request's keys take depends on the longest index an array may
    have (``max_events``), not on this one's length: a retry of the same key with more events
    (or fewer, or one) then finds the first ones' keys (published once), instead of a form of
    its own.

    Both may contain ':', which made the plain form ambiguous: an array under ``x`` and one
    event under ``x:1`` had a key in common, and so did key id ``a`` with ``b:c`` and key id
    ``a:b`` with ``c``. With a ':' in either, the digest form is taken, of the two as a JSON
    pair (the plain text, the digest's input before, is unambiguous without one: keys without
    a ':' are unchanged)."""
    namespaced = f"http:{key_id}:{idempotency_key}"
    longest = len(f":{max(0, max_events - 1)}")
    if ":" in key_id or ":" in idempotency_key:
        # (A JSON array never equals the plain text, which starts with "http:".)
        whole = msgspec.json.encode([key_id, idempotency_key])
        namespaced = "http:~" + hashlib.blake2b(whole, digest_size=16).hexdigest()
    elif len(namespaced) + longest > _PUBLISHER_KEY_MAX:
        namespaced = "http:~" + hashlib.blake2b(namespaced.encode(), digest_size=16).hexdigest()
    return [namespaced] + [f"{namespaced}:{index}" for index in range(1, count)]


def _publish_error_status(exc: PublishError) -> tuple[int, str]:
    # An idempotency key reused for another payload is the caller's mistake (409); any other
    # PublishError is Redis refusing the write (a damaged key, a script error): 502.
    causes = exc.errors.values() if isinstance(exc, PublishManyError) else [exc]
    if any(isinstance(cause, IdempotencyConflict) for cause in causes):
        return 409, "idempotency_conflict"
    return 502, "publish_failed"


async def _respond(
    send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes = b"application/json",
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sent_path(scope: dict) -> str:
    """The request's path as the client sent it (ASGI ``raw_path``, without the query), or the
    decoded ``path`` from a server that gives no ``raw_path``. What is not ASCII matches no
    route either way."""
    raw = scope.get("raw_path")
    if raw is None:
        return scope["path"]
    return raw.decode("latin-1")
