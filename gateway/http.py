"""Plain HTTP on the gateway's port: every request without ``Upgrade: websocket`` that is not an
SSE stream (:mod:`gateway.websocket` hands it here, and sends the answer with websockets).

Routes: ``/healthz``, ``/readyz``, ``/metrics``, ``/eventbus.js`` (+ ``.d.ts``), the polling
fallback ``GET /v1/projects/{id}/events``, and the CORS preflight of every route, SSE streams'
included (the streams themselves are :mod:`gateway.sse`). Anything that is not a WebSocket upgrade
and not one of these gets a JSON 404/405; nothing here can raise into the transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import os
import re
from collections.abc import Awaitable, Callable
from importlib import resources

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.client_input import parse_project_id
from gateway.revocations import RevocationsUnknown, TokenRevoked
from gateway.sequencing import Snapshot, plan_poll
from gateway.store import ProjectUnreadable, StoreUnavailable
from schemas.history import parse_poll_query, poll_response
from schemas.protocol import encode
from schemas.tokens import InvalidToken, TokenClaims
from serverkit import KeyedSingleFlight

__all__ = ["HttpRoutes", "answer_to", "cors_headers", "draining_response", "json_response"]

_POLL_PATH = re.compile(r"^/v1/projects/([^/]+)/events$")
_STATIC = {
    "/eventbus.js": "text/javascript; charset=utf-8",
    "/eventbus.d.ts": "application/typescript; charset=utf-8",
}
#: Seconds a poller is asked to wait (``Retry-After``) when Redis did not answer in time.
POLL_RETRY_AFTER = 5


def json_response(
    status: int, body: object, headers: list[tuple[str, str]] | None = None
) -> Response:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return _response(status, data, "application/json", headers)


def cors_headers(origin: str) -> list[tuple[str, str]]:
    """The CORS headers of an answer to an allowed ``Origin``: the page may read it, and its
    ``Retry-After`` (not a header CORS lets a page read unless exposed), so that a browser client
    refused with 503 waits as long as the gateway asked."""
    return [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Expose-Headers", "Retry-After"),
        ("Vary", "Origin"),
    ]


def draining_response() -> Response:
    """503 ``draining``: the pod is going away; the client retries elsewhere at once."""
    return json_response(
        503, {"error": "draining", "message": "reconnect elsewhere"}, [("Retry-After", "1")]
    )


def tokens_unchecked_response(
    exc: RevocationsUnknown, headers: list[tuple[str, str]] | None = None
) -> Response:
    """503 ``unavailable`` (``Retry-After: 1``): a token was not checked, the revocation list is
    not read yet (:class:`gateway.revocations.RevocationsUnknown`); retry shortly."""
    return json_response(
        503, {"error": "unavailable", "message": str(exc)}, [("Retry-After", "1"), *(headers or ())]
    )


def _error(
    status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    return json_response(status, {"error": code, "message": message}, headers)


def _response(
    status: int, body: bytes, content_type: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    for name, value in extra or ():
        headers[name] = value
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


class HttpRoutes:
    """The HTTP side of one gateway process."""

    def __init__(
        self,
        *,
        gateway,  # gateway.server.Gateway (not imported: it imports us)
        verify: Callable[[str], TokenClaims] | None,
        allowed_origins: list[str],
    ) -> None:
        self.gateway = gateway
        self.verify = verify
        self.allowed_origins = allowed_origins
        self._static_cache: dict[str, bytes] = {}
        #: The history reads of polls in flight, by page (project, epoch, after, limit): polls
        #: of a page made while it is being read wait for that read (one per page, not one per
        #: poll: pollers of a project woken by the same event ask for the same page at once).
        self._reads: KeyedSingleFlight[tuple, Snapshot] = KeyedSingleFlight()
        self.routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
        }

    async def handle(self, request: Request, peer: str | None = None) -> Response:
        """The answer to ``request``; ``peer`` (``host:port``, when known) names the client in
        the log lines of its refusals."""
        gateway = self.gateway
        try:
            # Open-ended, unless the gateway drains: a request still being handled at the
            # drain's deadline (a poll waiting for Redis) is answered 503 then, so the drain
            # never waits longer for it (Gateway.cut_answers).
            async with asyncio.timeout(None) as bound:
                gateway.answer_started(bound)
                try:
                    response = await self._route(request, peer)
                finally:
                    gateway.answer_ended(bound)
        except TimeoutError:
            if not bound.expired():
                raise  # not the drain's cut: the handler's own (answered 500 by the caller)
            response = draining_response()
            for name, value in self._cors_headers(request) or ():
                response.headers[name] = value
        return answer_to(request, response)

    async def _route(self, request: Request, peer: str | None) -> Response:
        path, query = _split_target(request.path)
        cors = self._cors_headers(request)
        if request.method == "OPTIONS":
            if cors is None:
                return self._forbidden_origin(request)
            return _response(
                204,
                b"",
                "text/plain",
                [
                    *cors,
                    ("Access-Control-Allow-Methods", "GET, OPTIONS"),
                    # Last-Event-ID: an SSE stream resumed by fetch() (see gateway.sse).
                    ("Access-Control-Allow-Headers", "Authorization, Last-Event-ID"),
                    ("Access-Control-Max-Age", "600"),
                ],
            )
        if request.method not in ("GET", "HEAD"):
            return _error(
                405,
                "method_not_allowed",
                f"{request.method} is not supported",
                [("Allow", "GET, HEAD, OPTIONS")],
            )
        if path in self.routes:
            return await self.routes[path](request)
        if path in _STATIC:
            return self.static(path)
        match = _POLL_PATH.match(path)
        if match:
            if cors is None:
                # Refused as a WebSocket handshake or a stream from that origin is: answered
                # without CORS headers, a browser would not show it to the page, but the request
                # would still cost a token check and a Redis read.
                return self._forbidden_origin(request)
            # A draining or full pod refuses a poll as it refuses a handshake or a stream (503,
            # Retry-After), before its token or Redis is looked at: the client (a load balancer
            # first) polls another pod, and the catch-up pages of a pod going away are not read
            # from it. The answer carries CORS headers, so a page sees the 503 itself.
            response = self.gateway.clients.pod_refusal() or await self.poll(
                request, match.group(1), query, peer
            )
            for name, value in cors or ():
                response.headers[name] = value
            return response
        return _error(404, "not_found", f"no route for {path}")

    def _forbidden_origin(self, request: Request) -> Response:
        """403 for a request (a poll, a preflight) from an origin not in ``--allowed-origins``,
        counted and logged as a refused handshake is (``ClientProtocol.refusal``)."""
        origin = request.headers.get("Origin", "")
        self.gateway.metrics.connections_rejected_total += 1
        self.gateway.client_log(
            "request refused", kind="forbidden_origin", reason="origin", origin=origin[:200]
        )
        return _error(403, "forbidden_origin", f"origin {origin[:200]!r} is not allowed")

    def _cors_headers(self, request: Request) -> list[tuple[str, str]] | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return []
        if self.allowed_origins and origin not in self.allowed_origins:
            return None
        return cors_headers(origin)

    async def healthz(self, request: Request) -> Response:
        worker = self.gateway.worker_id
        if worker is None:
            return json_response(200, {"status": "ok"})
        return json_response(200, {"status": "ok", "worker": worker, "pid": os.getpid()})

    async def readyz(self, request: Request) -> Response:
        checks = await self.gateway.readiness()
        group = self.gateway.group
        if group is not None:
            # Any worker answers for the whole --workers group: ready when every worker is.
            ready_workers = group.ready_workers(all(checks.values()))
            checks["all_workers"] = ready_workers >= group.workers
        status = 200 if all(checks.values()) else 503
        return json_response(status, {"ready": status == 200, "checks": checks})

    async def metrics(self, request: Request) -> Response:
        group = self.gateway.group
        if group is not None:
            body = group.render(self.gateway.ready_now)
        else:
            body = self.gateway.metrics.render()
        return _response(200, body, "text/plain; version=0.0.4")

    def static(self, path: str) -> Response:
        body = self._static_cache.get(path)
        if body is None:
            try:
                body = (resources.files("gateway") / "static" / path.lstrip("/")).read_bytes()
            except OSError:
                return _error(404, "not_found", f"{path} is not installed")
            self._static_cache[path] = body
        return _response(
            200,
            body,
            _STATIC[path],
            [("Cache-Control", "public, max-age=300"), ("Access-Control-Allow-Origin", "*")],
        )

    async def poll(
        self, request: Request, raw_id: str, query: str = "", peer: str | None = None
    ) -> Response:
        """``GET /v1/projects/{id}/events?epoch=&after=&tag=&limit=``: the polling fallback."""

        def refuse(
            status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
        ) -> Response:
            return self._refuse(status, code, message, headers, peer=peer)

        try:
            project_id = parse_project_id(raw_id)
        except ValueError as exc:
            return refuse(400, "invalid_project", str(exc))
        claims = None
        if self.verify is not None:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return refuse(
                    401,
                    "missing_token",
                    "send 'Authorization: Bearer <token>'",
                    [("WWW-Authenticate", "Bearer")],
                )
            try:
                claims = self.verify(token.strip())
            except InvalidToken as exc:
                return refuse(401, "invalid_token", str(exc), [("WWW-Authenticate", "Bearer")])
            except RevocationsUnknown as exc:
                return tokens_unchecked_response(exc)
            if not claims.allows(project_id):
                return refuse(403, "forbidden", f"the token does not allow project {project_id}")
            if self._expired(claims):
                # Taken (up to 5 s past ``exp``, the verifier's allowance for clock skew), but
                # answered after ``exp``: refused below anyway, so without the read.
                return refuse(
                    401, "invalid_token", "token expired", [("WWW-Authenticate", "Bearer")]
                )
        try:
            epoch, after, tag, limit = parse_poll_query(query)
        except ValueError as exc:
            return refuse(400, "invalid_query", str(exc))
        try:
            # The same bound as a subscribe: a hung Redis gets a 503 in time, not a dropped
            # request (the browser client's fetch would otherwise wait for its own timeout).
            async with asyncio.timeout(self.gateway.config.subscribe_timeout):
                # Polls of the same page made while it is being read share the read.
                snapshot = await self._reads(
                    (project_id, epoch, after, limit),
                    lambda: self._read(project_id, epoch, after, limit),
                )
        except (StoreUnavailable, TimeoutError) as exc:
            message = (
                "the project's data in Redis is unreadable; poll again later"
                if isinstance(exc, ProjectUnreadable)
                else "Redis is unavailable; poll again later"
            )
            return _error(503, "unavailable", message, [("Retry-After", str(POLL_RETRY_AFTER))])
        if claims is not None and self.gateway.token_revoked(claims):
            # Revoked while the page was read (this pod read a new list meanwhile): refused as
            # at arrival, as an open stream or WebSocket is closed.
            self.gateway.metrics.revoked_tokens_refused_total += 1
            return refuse(
                401, "invalid_token", str(TokenRevoked()), [("WWW-Authenticate", "Bearer")]
            )
        if claims is not None and self._expired(claims):
            # Expired while the page was read: nothing is sent on a token after its ``exp``,
            # as a WebSocket or a stream is closed then (4002).
            return refuse(401, "invalid_token", "token expired", [("WWW-Authenticate", "Bearer")])
        plan = plan_poll(epoch, after, snapshot, limit, tag)
        metrics = self.gateway.metrics
        metrics.polls_total += 1
        metrics.replayed_total += len(plan.events)
        if plan.resync is not None:
            metrics.resyncs_total += 1
        body = poll_response(project_id, snapshot, plan)
        return json_response(200, encode(body))

    def _expired(self, claims: TokenClaims) -> bool:
        """Whether the token's ``exp`` has passed, by the clock the expiry of the WebSockets'
        and streams' tokens is judged by (:class:`gateway.expiry.ExpiryWheel`'s: tests set
        their own)."""
        return self.gateway.clients.expiry.clock() >= claims.exp

    async def _read(
        self, project_id: int, epoch: str | None, after: int | None, limit: int
    ) -> Snapshot:
        """One history read for the polls of one page (see :meth:`poll`)."""
        config = self.gateway.config
        self.gateway.metrics.poll_reads_total += 1
        # Bounded by itself too (KeyedSingleFlight's contract): a poll that joins it late must
        # not keep it going past the bound of the poll that started it.
        async with asyncio.timeout(config.subscribe_timeout):
            # --poll-page-bytes: ``limit`` alone allowed 1,000 events of up to ~30 KB, a ~30 MB
            # answer held about three times over (the reply, the encoded page, the answer) by
            # each such poll at once; cut at the bound, the page says ``more`` as at ``limit``
            # (a page of one event may be larger: never none while events wait).
            return await self.gateway.store.snapshot(
                project_id, epoch, after, limit, max_bytes=config.poll_page_bytes
            )

    def _refuse(
        self,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        peer: str | None = None,
    ) -> Response:
        """A poll refused for the client's own mistake, counted as the same mistake is on a
        stream or a handshake: 400 in ``bad_requests_total``, 401 in ``auth_failures_total``,
        403 in ``client_errors_total``; and logged as a refused handshake is: "poll refused" at
        info (the client's mistake, never a warning), throttled per ``code`` (a few lines a
        minute each, the next one logged saying how many were ``suppressed``), with ``error``
        (the code), ``reason`` (the message), ``status`` and ``peer`` (when known). Without the
        line, a refusal showed in the totals and in no log."""
        gateway = self.gateway
        metrics = gateway.metrics
        if status == 400:
            metrics.bad_requests_total += 1
        elif status == 401:
            metrics.auth_failures_total += 1
        else:
            metrics.client_errors_total += 1
        gateway.client_log(
            "poll refused",
            kind=f"poll_{code}",  # a fixed set of codes: the throttle's table stays small
            error=code,
            reason=message[:200],
            status=status,
            peer=peer,
        )
        return _error(status, code, message, headers)


def answer_to(request: Request, response: Response) -> Response:
    """``response`` as the answer to ``request``: for HEAD, the GET's status and headers
    (Content-Length included) without its content (RFC 9110, 9.3.2), since a client reads bytes
    after the head as the start of another answer."""
    if request.method == "HEAD":
        return dataclasses.replace(response, body=b"")
    return response


def _split_target(target: str) -> tuple[str, str]:
    """A request target's path and query. Not ``urlsplit``: it parses a target such as
    ``//[x`` as an authority and raises on it; routes only ever match plain paths anyway."""
    path, _, query = target.partition("?")
    return path.partition("#")[0], query.partition("#")[0]
