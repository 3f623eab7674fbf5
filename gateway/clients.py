"""The client protocol, whatever the transport: admission, authentication, subscriptions, errors.

A WebSocket connection (:mod:`gateway.websocket`) and an SSE stream (:mod:`gateway.sse`) both drive
a :class:`ClientProtocol` with a :class:`gateway.session.ClientSession`; each transport only
turns its own input into these calls and the session's output into its own bytes:

* :meth:`ClientProtocol.refusal`: whether a new connection may open at all (draining, a full
  pod, a foreign ``Origin``), as the HTTP answer that refuses it (a poll is refused for the
  first two as well: :meth:`ClientProtocol.pod_refusal`);
* :meth:`ClientProtocol.verify_bearer`: an ``Authorization: Bearer`` header's claims;
* :meth:`ClientProtocol.authenticate`: claims for a session, with its expiry (one timer for
  all, :mod:`gateway.expiry`), and a refreshed token dropping the projects it no longer allows;
* :meth:`ClientProtocol.subscribe` / :meth:`ClientProtocol.unsubscribe` with their checks and
  errors; :meth:`ClientProtocol.decode` then :meth:`ClientProtocol.handle_decoded` for a
  frame (WebSocket: the client messages; :meth:`ClientProtocol.handle_now` does both), handled
  at once unless it has to wait for Redis, and :meth:`ClientProtocol.lane_of`: what it must
  wait for while others do (gateway.lanes);
* :meth:`ClientProtocol.activity` / :meth:`ClientProtocol.presence_get`: presence (who is
  here, what they are doing; docs/presence.md), which :meth:`ClientProtocol.subscribe` joins
  the connection to and :meth:`ClientProtocol.unsubscribe` leaves;
* :meth:`ClientProtocol.client_error`: an ``error`` message, counted, and the rule that ten
  malformed frames in a row close the connection (4009);
* the rate limit on client frames (``--client-rate``, ``--client-burst``; the token bucket is
  :mod:`gateway.ratelimit`): every frame takes a token, in the order sent;
  one over the limit is not executed and answered ``error`` ``rate_limited`` (its project, if
  it names one), except ``unsubscribe`` and ``ping``, executed all the same (answering them
  costs what refusing them would, and a refused unsubscribe would keep a subscription the client
  wants gone); a client that keeps sending while refused is closed with 4029.

Presence follows access control exactly as events do: a connection is listed in, and receives
presence of, only the projects its token allows and it is subscribed to (``presence_get`` needs
only the token); a refreshed token that drops a project leaves it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

import redis.exceptions

from gateway.client_input import decode_frame
from gateway.expiry import ExpiryWheel
from gateway.http import draining_response, json_response
from gateway.hub import SubscribeUnavailable
from gateway.lanes import BARRIER, FREE, Lane
from gateway.logs import describe, get_logger
from gateway.ratelimit import ALLOWED, CLOSE, REFUSED, frame_rate_limit
from gateway.revocations import RevocationsUnknown, TokenRevoked
from gateway.session import Outgoing
from schemas.protocol import (
    Activity,
    Auth,
    Authenticated,
    CloseCode,
    Error,
    ErrorCode,
    Ping,
    Pong,
    PresenceGet,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
)
from schemas.tokens import InvalidToken, TokenClaims

if TYPE_CHECKING:
    from websockets.http11 import Response

    from gateway.session import ClientSession

__all__ = ["MAX_CONSECUTIVE_ERRORS", "ClientProtocol", "presence_item"]

log = get_logger("gateway")

#: Consecutive malformed frames tolerated before the connection is closed with 4009.
MAX_CONSECUTIVE_ERRORS = 10

#: Frames executed even over the rate limit (they still count towards the close): answering
#: them costs what refusing them would, and a refused unsubscribe would keep a subscription
#: (its events, its presence) that the client wants gone.
_NEVER_REFUSED = frozenset({Unsubscribe, Ping})


class ClientProtocol:
    """What every transport's connections share; one per gateway process."""

    def __init__(self, gateway, verify: Callable[[str], TokenClaims] | None) -> None:
        # gateway.server.Gateway (not imported: it imports us): config, hub, metrics, draining.
        self.gateway = gateway
        self.config = gateway.config
        self.metrics = gateway.metrics
        #: None with ``--no-auth``: every project is allowed, no token is asked for.
        self.verify = verify
        #: The rate limit on client frames (None: ``--client-rate 0``), and its clock.
        self.rate_limit = frame_rate_limit(self.config.client_rate, self.config.client_burst)
        self.clock: Callable[[], float] = time.monotonic
        #: Every session's token expiry (the slot it returned is the session's ``expiry``).
        self.expiry: ExpiryWheel[ClientSession] = ExpiryWheel(self.expire)

    # --- admission ---------------------------------------------------------------------------

    def refusal(self, origin: str | None) -> Response | None:
        """The answer refusing a new client connection, or None when it may open."""
        refusal = self.pod_refusal()
        if refusal is not None:
            return refusal
        gateway, metrics = self.gateway, self.metrics
        allowed = self.config.allowed_origins
        # The allowlist stops other sites' pages from using a visitor's browser (browsers always
        # send Origin on a WebSocket handshake and a cross-origin request). A request without
        # Origin is not a browser's (the Python consumer, tail, curl): it is let through like the
        # polling endpoint lets it, and its token still decides what it may read. A client able
        # to leave Origin out could as well send an allowed one.
        if allowed and origin is not None and origin not in allowed:
            metrics.connections_rejected_total += 1
            gateway.client_log(
                "handshake refused",
                kind="forbidden_origin",
                reason="origin",
                origin=(origin or "")[:200],
            )
            return json_response(
                403, {"error": "forbidden_origin", "message": f"origin {origin!r} is not allowed"}
            )
        return None

    def pod_refusal(self) -> Response | None:
        """The 503 refusing a new connection or a poll because of the pod, not the client: it
        drains (``Retry-After: 1``: another pod answers at once) or it is full (``Retry-After:
        5``); None when neither. Counted in ``connections_rejected_total``."""
        gateway = self.gateway
        if gateway.draining:
            self.metrics.connections_rejected_total += 1
            return draining_response()
        if gateway.admission.full():
            self.metrics.connections_rejected_total += 1
            return json_response(
                503,
                {"error": "too_many_connections", "message": "this gateway is full"},
                [("Retry-After", "5")],
            )
        return None

    # --- authentication ----------------------------------------------------------------------

    def verify_bearer(self, header: str) -> TokenClaims:
        """The claims of an ``Authorization: Bearer <token>`` header; :class:`InvalidToken`
        (counted as an auth failure) when it is not one, or the token is not valid;
        :class:`RevocationsUnknown` (not an auth failure) before the revocation list is read."""
        assert self.verify is not None
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise InvalidToken("expected 'Authorization: Bearer <token>'")
            return self.verify(token.strip())
        except InvalidToken:
            self.metrics.auth_failures_total += 1
            raise

    def authenticate(self, session: ClientSession, claims: TokenClaims) -> None:
        """Give ``session`` these claims: (re)arm its expiry, drop projects a refreshed token no
        longer allows (``error`` forbidden + ``unsubscribed`` each), answer ``authenticated``."""
        previous, session.claims = session.claims, claims
        # The subject index finds the connections a revocation ends (gateway.revocations).
        self.gateway.subject_changed(session, previous.sub if previous else None, claims.sub)
        # One shared coarse timer (gateway.expiry), not a TimerHandle per connection: the
        # close comes at most a second after ``exp``, never before.
        session.expiry = self.expiry.add(session, claims.exp, session.expiry)
        # A refreshed token may name fewer projects: drop what it no longer allows.
        hub = self.gateway.hub
        for project_id in sorted(session.projects):
            if not claims.allows(project_id):
                hub.unsubscribe(session, project_id)
                self.gateway.presence.leave(session, project_id)
                session.send_message(
                    Error(
                        code=ErrorCode.FORBIDDEN,
                        project_id=project_id,
                        message="the refreshed token does not allow this project",
                    )
                )
                session.send_message(Unsubscribed(project_id=project_id))
        if previous is not None and (previous.sub, previous.name) != (claims.sub, claims.name):
            # Another person or display name: the tab is listed under the new one.
            for project_id in sorted(session.projects):
                self._list(session, project_id)
        projects = None if claims.projects == "*" else sorted(claims.projects)
        session.send_message(
            Authenticated(subject=claims.sub, projects=projects, expires_at=claims.exp)
        )

    def expire(self, session: ClientSession) -> None:
        """The session's token expired without a refresh: close it (4002)."""
        session.expiry = None
        session.close_later(CloseCode.TOKEN_EXPIRED, "token expired")

    def allowed(self, session: ClientSession, project_id: int) -> bool:
        if self.verify is None:
            return True
        return session.claims is not None and session.claims.allows(project_id)

    def check_allowed(self, session: ClientSession, project_id: int) -> bool:
        """:meth:`allowed`, answering ``forbidden`` when not (not counted as a client mistake:
        a token may rightly name fewer projects than the page shows)."""
        if self.allowed(session, project_id):
            return True
        self.client_error(
            session,
            ErrorCode.FORBIDDEN,
            f"the token does not allow project {project_id}",
            project_id,
            count=False,
        )
        return False

    # --- messages ----------------------------------------------------------------------------

    def decode(self, data: bytes | str) -> tuple[Any, ProtocolError | None]:
        """One frame from an authenticated client, parsed: (the message, None), or (None, the
        error) when it is malformed. Nothing is answered or counted yet (:meth:`handle_decoded`
        does that)."""
        try:
            return decode_frame(data), None
        except ProtocolError as exc:
            return None, exc

    def lane_of(self, session: ClientSession, message: Any, busy: Collection[int]) -> Lane:
        """What a decoded frame must wait for while some of the connection's frames wait for
        Redis (gateway.lanes; ``busy``: the projects with frames being handled or held): its
        project's earlier frames; every earlier frame (:data:`~gateway.lanes.BARRIER`) for an
        ``auth`` (the token every later frame is judged by) and for a subscribe that might find
        the connection at ``--max-subscriptions`` (the busy projects counted as subscribed, since
        a subscribe among their frames may yet add them; an unsubscribe held among them is not
        counted off: the subscribe waits for it instead); nothing (:data:`~gateway.lanes.FREE`)
        for a ping or a malformed frame."""
        if isinstance(message, Subscribe):
            project_id = message.project_id
            projects = session.projects
            if project_id not in projects:
                reachable = len(projects) + sum(1 for p in busy if p not in projects)
                if project_id not in busy:
                    reachable += 1
                if reachable > self.config.max_subscriptions:
                    return BARRIER
            return project_id
        if isinstance(message, (Unsubscribe, Activity, PresenceGet)):
            return message.project_id
        if isinstance(message, Auth):
            return BARRIER
        return FREE

    def handle_now(
        self, session: ClientSession, data: bytes | str, clog
    ) -> Coroutine[Any, Any, Any] | None:
        """One frame from an authenticated client: :meth:`decode`, then
        :meth:`handle_decoded`."""
        message, error = self.decode(data)
        return self.handle_decoded(session, message, error, clog)

    def take_token(self, session: ClientSession, message: Any) -> int | None:
        """The rate-limit token of a frame held back while some wait for Redis (gateway.lanes),
        taken before it is handled when a frame sent after it is handled first (a ping, at
        once), so that the tokens go to the frames in the order sent: its verdict for
        :meth:`handle_decoded`. None for an ``unsubscribe``, judged when handled (free when it
        leaves a subscription: a subscribe held before it may yet make one)."""
        limit = self.rate_limit
        if limit is None:
            return ALLOWED
        if type(message) is Unsubscribe:
            return None
        return limit.take(session, self.clock())

    def handle_decoded(
        self,
        session: ClientSession,
        message: Any,
        error: ProtocolError | None,
        clog,
        verdict: int | None = None,
        *,
        held: bool = False,
    ) -> Coroutine[Any, Any, Any] | None:
        """One decoded frame (``error``: it was malformed, answered ``error`` here), handled
        here and now when nothing has to wait for Redis: None then. Else the coroutine that
        finishes it (a subscribe that the feed's memory cannot answer, presence), which the
        transport runs before any frame that must come after it (:meth:`lane_of`). Every frame
        takes a token of the rate limit first (:meth:`_over_limit` answers one over it), unless
        it took it before (``verdict``: :meth:`take_token`).

        ``held``: the frame was held back behind frames waiting for Redis (gateway.lanes), and
        the transport ended the connection's run of malformed frames when it read it (malformed
        frames are handled at once: a well-formed frame ends the run where it was sent, not
        again where it is handled)."""
        limit = self.rate_limit
        if verdict is None and (
            limit is not None
            and not (
                # Leaving a subscription is free: its subscribe took a token. Churn (a page
                # flipping between projects) is then bounded by its subscribes alone, which
                # clients pace; an unsubscribe of nothing counts like any frame (a flood of them
                # is closed).
                type(message) is Unsubscribe and message.project_id in session.projects
            )
        ):
            verdict = limit.take(session, self.clock())
        if verdict and self._over_limit(session, message, verdict):
            return None
        if error is not None:
            self.client_error(session, error.code, error.message)
            return None
        if not held:
            session.errors = 0
        if isinstance(message, Subscribe):
            if (message.epoch is None) != (message.after is None):
                self.client_error(
                    session,
                    ErrorCode.INVALID_CURSOR,
                    "give both epoch and after to resume, or neither",
                    message.project_id,
                )
                return None
            if message.tag is not None and message.after is None:
                self.client_error(
                    session,
                    ErrorCode.INVALID_CURSOR,
                    "a tag names the event at a cursor: give it with epoch and after",
                    message.project_id,
                )
                return None
            if not message.presence and self._subscribe_from_memory(
                session, message.project_id, message.epoch, message.after, message.tag
            ):
                return None
            return self.subscribe(
                session,
                message.project_id,
                message.epoch,
                message.after,
                clog,
                presence=message.presence,
                tag=message.tag,
            )
        if isinstance(message, Activity):
            self.activity(session, message)
        elif isinstance(message, PresenceGet):
            return self.presence_get(session, message.project_id)
        elif isinstance(message, Unsubscribe):
            self.unsubscribe(session, message.project_id)
        elif isinstance(message, Ping):
            session.send_message(Pong())
        elif isinstance(message, Auth):
            if self.verify is None:
                session.send_message(Authenticated(subject=None, projects=None, expires_at=None))
                return None
            try:
                claims = self.verify(message.token)
            except RevocationsUnknown as exc:
                # (Only before the first read of the list, when no connection is authenticated
                # yet: kept for verify's contract.) The connection keeps its current token.
                self.client_error(session, ErrorCode.UNAVAILABLE, str(exc), count=False)
                return None
            except InvalidToken as exc:
                # The connection keeps its current token, unless that one is revoked too.
                self.client_error(session, ErrorCode.INVALID_TOKEN, str(exc), count=False)
                current = session.claims
                if (
                    isinstance(exc, TokenRevoked)
                    and current is not None
                    and self.gateway.token_revoked(current)
                ):
                    self.metrics.revocation_disconnects_total += 1
                    session.close_later(CloseCode.TOKEN_REVOKED, "token revoked")
                return None
            self.authenticate(session, claims)
        return None

    def _over_limit(self, session: ClientSession, message: Any, verdict: int) -> bool:
        """A frame over the rate limit (``message`` None: a malformed one): True when it is not
        executed (answered ``rate_limited`` here, and the connection closed on :data:`CLOSE`);
        False for an ``unsubscribe`` or ``ping``, executed all the same."""
        if verdict == REFUSED and type(message) in _NEVER_REFUSED:
            return False
        limit = self.rate_limit
        assert limit is not None
        self.metrics.client_frames_rate_limited_total += 1
        kind = "frame" if message is None else type(message).__struct_config__.tag
        retry_after_ms = limit.retry_after_ms(session)
        session.send_message(
            Error(
                code=ErrorCode.RATE_LIMITED,
                message=(
                    f"too many frames: {limit.describe()} per connection; this {kind} was not "
                    f"executed: send it again in {retry_after_ms / 1000:.3g} s or later"
                ),
                project_id=getattr(message, "project_id", None),
                retry_after_ms=retry_after_ms,
                refused=None if message is None else kind,
            )
        )
        if verdict == CLOSE:
            self.metrics.rate_limit_disconnects_total += 1
            self.gateway.client_log(
                "client closed for exceeding the rate limit",
                kind="rate_limit_close",
                conn_id=session.id,
                transport=session.transport_name,
            )
            session.close_later(CloseCode.TOO_MANY_REQUESTS, "too many requests")
        return True

    def _subscribe_from_memory(
        self,
        session: ClientSession,
        project_id: int,
        epoch: str | None,
        after: int | None,
        tag: str | None = None,
    ) -> bool:
        """:meth:`subscribe` without presence, when the feed's memory answers it (the common
        case of a reconnect storm): no suspension, no task. False when it cannot (nothing has
        changed then) or a check failed (its ``error`` is sent)."""
        if not self.check_allowed(session, project_id):
            return True
        if not self._room_for(session, project_id):
            return True
        if not self.gateway.hub.subscribe_from_memory(session, project_id, epoch, after, tag):
            return False
        self._list(session, project_id)
        self.gateway.presence.unsubscribe(session, project_id)
        return True

    def _room_for(self, session: ClientSession, project_id: int) -> bool:
        """Whether the connection may follow one more project (answers ``error`` if not)."""
        limit = self.config.max_subscriptions
        if project_id not in session.projects and len(session.projects) >= limit:
            self.client_error(
                session,
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {limit} projects per connection",
                project_id,
                count=False,
            )
            return False
        return True

    async def subscribe(
        self,
        session: ClientSession,
        project_id: int,
        epoch: str | None,
        after: int | None,
        clog,
        *,
        presence: bool = False,
        tag: str | None = None,
    ) -> bool:
        """Subscribe with the checks a client may fail (each answers ``error``); True when the
        hub took the subscription (its replay and ``subscribed`` are on their way). ``tag``:
        the tag of the event the client has at ``after`` (checked against the history).

        The connection is then listed in the project's presence (when its token has a ``sub``),
        and with ``presence`` it gets the ``presence`` message after ``subscribed`` and then
        the project's ``presence_diff`` messages; a re-subscribe without it stops them."""
        if not self.check_allowed(session, project_id) or not self._room_for(session, project_id):
            return False
        try:
            await self.gateway.hub.subscribe(session, project_id, epoch, after, tag)
        except SubscribeUnavailable as exc:
            # A failed re-subscribe has ended the old subscription: its presence ends with it.
            self.gateway.presence.leave(session, project_id)
            self.gateway.client_log_throttle.log(
                "subscribe_unavailable",
                clog.warning,
                "subscribe failed",
                project_id=project_id,
                error=describe(exc),
            )
            self.client_error(
                session,
                ErrorCode.UNAVAILABLE,
                "Redis is unavailable; subscribe again later",
                project_id,
                count=False,
            )
            return False
        if session.closing or project_id not in session.projects:
            # The connection closed while the hub waited, or the subscription ended before it
            # went live (the project's metadata turned out unreadable; the hub's ``error`` said
            # so): nothing to list, since presence is visible only where events are.
            return False
        self._list(session, project_id)
        service = self.gateway.presence
        if not presence:
            service.unsubscribe(session, project_id)
            return True
        try:
            async with asyncio.timeout(self.config.subscribe_timeout):
                frame = await service.subscribe(session, project_id)
        except (TimeoutError, redis.exceptions.RedisError, OSError):
            if project_id not in session.projects:
                # The subscription ended while presence was read (the hub's ``error`` with
                # ``ended`` said so): an ``unavailable`` without ``ended`` would say the events
                # flow, and a client that subscribed again meanwhile would take it for the
                # answer to that subscribe.
                return True
            self.client_error(
                session,
                ErrorCode.UNAVAILABLE,
                "presence is unavailable (Redis did not answer); events are not affected; "
                "subscribe again later for presence",
                project_id,
                count=False,
            )
            return True
        if project_id in session.projects and session in self.gateway.sessions:
            session.send(presence_item(frame, project_id, "presence"))
        else:  # unsubscribed or closed while presence was read
            service.unsubscribe(session, project_id)
        return True

    def _list(self, session: ClientSession, project_id: int) -> None:
        """List the connection in the project's presence as its token's person (a token
        without ``sub`` reads presence but is not listed; past ``presence_max_members``, or with
        a ``sub`` longer than ``MAX_MEMBER_ID_LENGTH``, a person is not listed either, counted)."""
        service = self.gateway.presence
        claims = session.claims
        if claims is None or not claims.sub:
            service.leave(session, project_id, messages=False)
        elif not service.core.can_list(claims.sub):
            self.metrics.presence_unlisted_total += 1
            service.leave(session, project_id, messages=False)
        elif service.core.is_full(
            project_id, claims.sub, self.config.presence_max_members, session
        ):
            # Not listed now, but once a place frees (someone leaves): it waits for one.
            self.metrics.presence_unlisted_total += 1
            service.wait(
                session, project_id, claims.sub, claims.name, self.config.presence_max_members
            )
        else:
            service.join(session, project_id, claims.sub, claims.name)

    def activity(self, session: ClientSession, message: Activity) -> None:
        """This tab's activity in a subscribed project (ignored for a tab that is not listed)."""
        if message.project_id not in session.projects:
            self.client_error(
                session,
                ErrorCode.NOT_SUBSCRIBED,
                f"subscribe to project {message.project_id} before reporting activity in it",
                message.project_id,
                count=False,
            )
            return
        self.gateway.presence.activity(
            session, message.project_id, message.viewing, message.answering
        )

    async def presence_get(self, session: ClientSession, project_id: int) -> None:
        """Answer ``presence`` once: the project's members (the token must allow it)."""
        if not self.check_allowed(session, project_id):
            return
        try:
            async with asyncio.timeout(self.config.subscribe_timeout):
                frame = await self.gateway.presence.get(project_id)
        except (TimeoutError, redis.exceptions.RedisError, OSError):
            self.client_error(
                session,
                ErrorCode.UNAVAILABLE,
                "presence is unavailable (Redis did not answer); ask again later",
                project_id,
                count=False,
            )
            return
        session.send(presence_item(frame, project_id, "presence"))

    def unsubscribe(self, session: ClientSession, project_id: int) -> None:
        if self.gateway.hub.unsubscribe(session, project_id):
            self.gateway.presence.leave(session, project_id)
            session.send_message(Unsubscribed(project_id=project_id))
        else:
            self.client_error(
                session,
                ErrorCode.NOT_SUBSCRIBED,
                f"not subscribed to project {project_id}",
                project_id,
                count=False,
            )

    def client_error(
        self,
        session: ClientSession,
        code: ErrorCode,
        message: str,
        project_id: int | None = None,
        *,
        count: bool = True,
    ) -> None:
        """Answer ``error`` (a metric, not a log line); ``count``: a malformed frame, and the
        tenth in a row closes the connection with 4009."""
        self.metrics.client_errors_total += 1
        session.send_message(Error(code=code, message=message[:500], project_id=project_id))
        if count:
            session.errors += 1
            if session.errors >= MAX_CONSECUTIVE_ERRORS:
                session.close_later(CloseCode.TOO_MANY_ERRORS, "too many malformed messages")


def presence_item(frame: bytes, project_id: int, kind: str) -> Outgoing:
    """A ``presence`` or ``presence_diff`` frame as an outgoing item (SSE names its event by
    ``kind``); one item is shared by every recipient of a diff."""
    item = Outgoing(frame, project_id)
    item.kind = kind
    return item
