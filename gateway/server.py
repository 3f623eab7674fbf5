"""The gateway process: the listening socket, periodic checks, drain.

Wiring only; the ordering logic is in :mod:`gateway.sequencing` and :mod:`gateway.hub`, the
client protocol (auth, subscribe, errors) in :mod:`gateway.clients`, the transports in
:mod:`gateway.websocket` and :mod:`gateway.sse`, the outbound policy in :mod:`gateway.session`,
HTTP in :mod:`gateway.http`, presence in :mod:`gateway.presence_store` (its channels ride on the
same pub/sub link as the events).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeaderValue
from websockets.http11 import Response

from gateway.clients import MAX_CONSECUTIVE_ERRORS, ClientProtocol, presence_item
from gateway.cluster_pubsub import ClusterPubSub
from gateway.config import GatewayConfig
from gateway.descriptors import NODE_CONNECTIONS, REDIS_SOCKETS_PER_MASTER, fitted_connections
from gateway.group import GroupView
from gateway.http import HttpRoutes, json_response
from gateway.hub import Hub
from gateway.keepalive import Keepalive
from gateway.logs import describe, get_logger
from gateway.metrics import Metrics
from gateway.presence_store import PresenceService
from gateway.pubsub import PubSubLink
from gateway.revocations import RevocationsUnknown, RevocationWatcher, TokenRevoked
from gateway.session import Admission, ClientSession, SlowConsumerPolicy, unsent
from gateway.sse import SseStreams
from gateway.store import HistoryStore
from gateway.websocket import WebSocketEndpoint
from gateway.workers import GROUP_SIZE_ENV, WORKER_ID_ENV
from redisconn import async_client, is_cluster_url
from schemas.keys import Keys
from schemas.protocol import CloseCode
from schemas.stored import ForeignKind
from schemas.tokens import TokenClaims, TokenVerifier
from serverkit import LogThrottle, SingleFlight
from serverkit.descriptors import LIMIT_HINT

__all__ = ["MAX_CONSECUTIVE_ERRORS", "Gateway", "run"]

log = get_logger("gateway")

#: Pending connections the kernel queues for accept() (capped by net.core.somaxconn). asyncio's
#: default of 100 overflows in a reconnect storm: the kernel then drops handshakes, and each
#: dropped client waits a 1 s SYN retransmission (2,229 drops while 10,000 clients resumed).
#: Queued connections cost the process no descriptor: only accept() gives them one.
LISTEN_BACKLOG = 4096

#: Connections asyncio's event loop accepts per wakeup of the listening socket. It takes as many
#: as the ``backlog`` given to ``create_server``, and each reaches the admission bound only two
#: iterations of the loop later (a task makes its transport, then ``connection_made`` runs), a
#: dropped one is closed one more later: with a batch of 4096, a burst at a full pod took more
#: descriptors than the process had before admission could drop any, accept() failed (EMFILE),
#: asyncio logged an error and stopped accepting for a second. With this batch at most three
#: batches (96 sockets) are past the bound at once, which the descriptor reserve of
#: ``gateway.__main__`` covers. The kernel's queue stays :data:`LISTEN_BACKLOG` (the socket is
#: put back to it after ``create_server``). uvloop (libuv) accepts one connection per wakeup
#: whatever the backlog, and sheds load quietly should accept() fail all the same.
ACCEPT_BATCH = 32

#: Sockets accepted beyond ``--max-connections`` before further ones are dropped at accept: room
#: for a polite 503 to a client arriving at a full pod, and for health probes and scrapes.
ACCEPT_SLACK = 64

#: Seconds the drain gives the HTTP requests it ended at its deadline to write their 503s (it
#: takes a few iterations of the event loop).
CUT_ANSWERS_TIMEOUT = 0.5

#: Seconds between the drain's looks at the HTTP answers still being sent (a page to a slow
#: reader): :func:`gateway.session.unsent` is not an event to wait for.
SENDING_CHECK_INTERVAL = 0.05

#: Seconds one call on the gateway's Redis client may take (a command, a script, a pipeline),
#: retries and reconnects included: a call site that forgets its own ``asyncio.timeout`` still
#: returns when Redis hangs. The call sites bound themselves more tightly where a client waits
#: (``--subscribe-timeout``, presence rounds, readiness), so this is the backstop.
REDIS_CALL_TIMEOUT = 10.0

#: Seconds each step of the final shutdown (listener, feeds, pub/sub, Redis client) may take
#: after the clients are gone: a hung Redis must not hold the exit.
CLOSE_STEP_TIMEOUT = 2.0

#: Seconds Redis has to answer the ``PING`` of a readiness check (``/readyz``, the group's sync).
READINESS_TIMEOUT = 1.0

#: Seconds the start waits for the first read of the revocation list before opening the port.
FIRST_REVOCATIONS_WAIT = 1.0


class Gateway:
    """One gateway process. ``await start()``, then ``await drain()`` to stop."""

    def __init__(self, config: GatewayConfig, *, configured_connections: int | None = None) -> None:
        self.config = config
        #: ``--max-connections`` as the operator set it, before ``gateway.__main__`` lowered it
        #: (``config.max_connections``) to fit the descriptor limit: what the warnings of
        #: :meth:`fit_to_masters` name as ``configured``.
        self.configured_connections = (
            config.max_connections if configured_connections is None else configured_connections
        )
        self.keys = Keys(config.prefix)
        self.metrics = Metrics()
        self.sessions: dict[ClientSession, None] = {}
        self.draining = False
        self.policy = SlowConsumerPolicy(config.outbound_limit, config.stall_timeout)
        self.admission = Admission(config.max_connections, ACCEPT_SLACK)
        #: Redis Cluster masters the admission bound was last fitted to (:meth:`fit_to_masters`).
        self.fitted_masters = 0
        # Lines caused by clients (failed auth, refused handshakes, unavailable subscribes): a few
        # per minute per kind; the counters count every one.
        self.client_log_throttle = LogThrottle()
        self._tasks: list[asyncio.Task] = []
        self._all_closed = asyncio.Event()
        #: The bounds of the HTTP requests being handled (a poll waiting for Redis, say), which
        #: the drain moves to its deadline (:meth:`cut_answers`); the event is set when none.
        self.http_answers: set[asyncio.Timeout] = set()
        self._answers_done = asyncio.Event()
        self._answers_done.set()
        #: The transports of the HTTP answers written, from the write to the connection's end:
        #: the drain waits, within its deadline, until each is sent, so that the exit does not
        #: cut an answer still in the transport's buffer or the kernel's (a page, a slow link).
        self.http_sending: set[asyncio.WriteTransport] = set()
        self.server: asyncio.Server | None = None
        #: In a ``--workers`` group (see gateway.workers): this worker's number and the group's
        #: shared view of metrics and readiness; None for a single gateway.
        self.worker_id: str | None = os.environ.get(WORKER_ID_ENV)
        self.group: GroupView | None = None
        #: Readiness as of the last group sync (once a second), for the group's /metrics.
        self.ready_now = False
        #: The readiness ``PING`` in flight, shared by every check made meanwhile.
        self._ping = SingleFlight(self._ping_redis)
        self.redis: redis.asyncio.Redis | None = None
        self.store: HistoryStore
        self.hub: Hub
        self.presence: PresenceService
        self.link: PubSubLink | ClusterPubSub
        #: The revocation list and the subject index (gateway.revocations); None with
        #: ``--revocation-poll-interval 0`` or ``--no-auth`` (no token to revoke), and before
        #: start.
        self.revocations: RevocationWatcher[ClientSession] | None = None
        #: HS256 only: the gateway has no setting for other algorithms (docs/publisher.md). Built
        #: once: the secret's checks, done by PyJWT for every token otherwise, are a fifth of one.
        self.verifier: TokenVerifier | None = None
        if not config.no_auth:
            assert config.auth_secret is not None  # GatewayConfig checked it is there and usable
            self.verifier = TokenVerifier(config.auth_secret)
        verify = None if config.no_auth else self.verify
        self.http = HttpRoutes(gateway=self, verify=verify, allowed_origins=config.allowed_origins)
        self.clients = ClientProtocol(self, verify)
        self.streams = SseStreams(self)
        self.websockets = WebSocketEndpoint(self)
        self.metrics.gauge(
            "connections",
            "Open client connections (WebSocket and SSE streams).",
            lambda: len(self.sessions),
        )
        self.metrics.gauge(
            "sockets",
            "Sockets open on the port, from accept to close (handshakes, unauthenticated, HTTP).",
            lambda: self.admission.open,
        )
        self.metrics.gauge(
            "subscriptions", "Project subscriptions.", lambda: self.hub.subscriptions
        )
        self.metrics.gauge(
            "projects", "Projects followed by this pod.", lambda: len(self.hub.feeds)
        )
        self.metrics.gauge(
            "pubsub_up", "1 when the pub/sub link is connected.", lambda: int(self.link.connected)
        )
        self.metrics.gauge("draining", "1 while draining.", lambda: int(self.draining))
        self.metrics.gauge(
            "revocations",
            "Token revocations in force on this process (the list last read from Redis).",
            lambda: len(self.revocations.current) if self.revocations is not None else 0,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def verify(self, token: str) -> TokenClaims:
        """The claims of a valid token that is not revoked; :class:`InvalidToken` else (a
        :class:`TokenRevoked` for a revoked one, counted). Every token the gateway takes is
        checked here: the first ``auth``, a refresh, a handshake's, a stream's or a poll's
        ``Authorization`` header.

        Fails closed: a valid token is refused with :class:`RevocationsUnknown` (counted; not
        an :class:`InvalidToken`) until the revocation list has been read once, since this
        process cannot tell yet whether it is revoked."""
        assert self.verifier is not None
        claims = self.verifier.verify(token)
        revocations = self.revocations
        if revocations is not None and not revocations.loaded.is_set():
            self.metrics.revocations_unknown_refusals_total += 1
            raise RevocationsUnknown()
        if self.token_revoked(claims):
            self.metrics.revoked_tokens_refused_total += 1
            raise TokenRevoked()
        return claims

    def token_revoked(self, claims: TokenClaims) -> bool:
        """Whether the revocation list in force refuses these (verified) claims."""
        return self.revocations is not None and self.revocations.is_revoked(claims)

    async def start(self) -> None:
        config = self.config
        if config.no_auth:
            log.warning(
                "DEVELOPMENT MODE: authentication is disabled; any client can read any project",
                flag="--no-auth",
            )
        elif len(config.auth_secret or "") < 32:
            log.warning("the auth secret is shorter than 32 bytes; HS256 wants at least 32")
        self.redis = redis_client(config.redis_url)
        self.store = HistoryStore(self.redis, self.keys)
        if self.verifier is not None and config.revocation_poll_interval > 0:
            self.revocations = RevocationWatcher(
                self.redis,
                self.keys,
                interval=config.revocation_poll_interval,
                metrics=self.metrics,
                close=_close_revoked,
            )
            self.revocations.start()
            # The port opens with the list read, unless Redis is slow to answer: then within
            # FIRST_REVOCATIONS_WAIT, /readyz saying not ready until the first read, and every
            # token refused meanwhile as not checkable yet (verify: 1013, 503), not taken.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_REVOCATIONS_WAIT):
                    await self.revocations.loaded.wait()
        self.hub = Hub(
            keys=self.keys,
            store=self.store,
            metrics=self.metrics,
            max_replay=config.max_replay,
            subscribe_timeout=config.subscribe_timeout,
            window_events=config.resume_window_events,
            window_bytes=config.resume_window_bytes,
        )
        self.link = self._make_link()
        self.hub.link = self.link
        self.presence = PresenceService(
            self.redis,
            self._deliver_presence,
            keys=self.keys,
            ttl=config.presence_ttl,
            refresh_interval=config.presence_refresh_interval,
            diff_interval=config.presence_diff_interval,
            drain_grace=config.presence_drain_grace,
            publish_command="SPUBLISH" if config.sharded else "PUBLISH",
            link=self.link,
            on_repaired=self._presence_key_repaired,
            max_members=config.presence_max_members,
            on_left_out=self._presence_left_out,
            max_announcement=config.presence_max_announcement,
            on_unannounced=self._presence_unannounced,
        )
        # A subscription the hub ends (its project turned unreadable) takes the tab's presence
        # in the project with it, as an unsubscribe does.
        self.hub.on_subscription_ended = self.presence.leave
        self.link.start()
        await self.presence.start()
        self._tasks = [
            asyncio.create_task(self._every(config.reconcile_interval, self.hub.reconcile)),
            asyncio.create_task(self._every(1.0, self._check_stalls)),
        ]
        # One timer pings every connection (see gateway.keepalive), not a task per connection.
        self.keepalive = Keepalive(config.ping_interval, config.ping_timeout, _keepalive_timeout)
        self.keepalive.start()
        # SSE streams get a comment line instead, on their own interval (no answer awaited).
        self.streams.keepalive = Keepalive(
            config.sse_keepalive_interval, config.ping_timeout, _keepalive_timeout
        )
        self.streams.keepalive.start()
        if is_cluster_url(config.redis_url):
            # The masters are known before the port opens (unless the cluster is slow to
            # answer: then within a second of the first map), and followed after.
            # (redis-py's "cluster unreachable" is not a RedisError.)
            with contextlib.suppress(
                redis.exceptions.RedisError,
                redis.exceptions.RedisClusterException,
                OSError,
                TimeoutError,
            ):
                async with asyncio.timeout(FIRST_REVOCATIONS_WAIT):
                    await self.redis.initialize()
            self.fit_to_masters()
            self._tasks.append(asyncio.create_task(self._every(1.0, self.fit_to_masters)))
        group_size = os.environ.get(GROUP_SIZE_ENV)
        if group_size:
            self.group = GroupView(
                self.metrics,
                workers=int(group_size),
                directory=os.environ["PROMETHEUS_MULTIPROC_DIR"],
                worker_id=self.worker_id,
            )
            self._tasks.append(asyncio.create_task(self._every(1.0, self._sync_group)))
        self.server = await asyncio.get_running_loop().create_server(
            self.websockets.connection,
            config.host,
            config.port,
            backlog=ACCEPT_BATCH,  # what asyncio accepts per wakeup: see ACCEPT_BATCH
            # Workers of one group share the port; the kernel spreads new connections.
            reuse_port=self.group is not None,
        )
        for listening in self.server.sockets:
            with listening.dup() as sock:  # the same socket: the loop's object has no listen()
                sock.listen(LISTEN_BACKLOG)
        log.info(
            "gateway listening",
            host=config.host,
            port=self.port,
            redis=_redact(config.redis_url),
            sharded_pubsub=config.sharded,
            auth="disabled" if config.no_auth else "jwt",
            loop=event_loop_name(asyncio.get_running_loop()),
            **({"worker": self.worker_id} if self.worker_id is not None else {}),
        )

    def _make_link(self) -> PubSubLink | ClusterPubSub:
        """One subscribed connection for a standalone Redis; on a Cluster, one per master with
        channels routed by slot (sharded pub/sub only reaches the shard that owns the slot)."""
        config = self.config
        options = {
            "on_message": self._on_pubsub_message,
            "metrics": self.metrics,
            "probe_interval": config.probe_interval,
            "probe_timeout": config.probe_timeout,
        }
        if is_cluster_url(config.redis_url) and config.sharded:
            return ClusterPubSub(config.redis_url, on_recovered=self._catch_up, **options)
        # Classic PUBLISH reaches every node of a cluster: any one node will do then.
        return PubSubLink(
            config.redis_url.replace("+cluster", ""),
            sharded=config.sharded,
            on_resubscribed=self._on_link_resubscribed,
            **options,
        )

    def _on_pubsub_message(self, channel: bytes, data: bytes) -> None:
        """Every pub/sub message: a project's presence channel, or (the hot path) its events."""
        if channel.endswith(b":presence"):
            self.presence.on_message(channel, data)
        else:
            self.hub.on_pubsub_message(channel, data)

    def _on_link_resubscribed(self) -> None:
        """The pub/sub link is back: what was published meanwhile is only in Redis."""
        self.hub.on_link_resubscribed()
        self.presence.reread_all()

    def _presence_key_repaired(self, project_id: int, keys: int) -> None:
        """A presence index key held another type and was replaced (the service logs it)."""
        self.metrics.foreign_values[ForeignKind.PRESENCE_KEY.value] += keys

    def _presence_unannounced(self, project_id: int, n: int) -> None:
        """Presence writes of a project announced without their records (too large)."""
        self.metrics.presence_unannounced_writes_total += n

    def _presence_left_out(self, project_id: int, n: int) -> None:
        """A project's presence in Redis held more pods or members than pods write."""
        self.metrics.foreign_values[ForeignKind.PRESENCE_MEMBERS.value] += n

    def _deliver_presence(self, sessions, frame: bytes) -> None:
        """One ``presence_diff`` to its recipients: one shared item, queued like events."""
        item = presence_item(frame, 0, "presence_diff")
        for session in sessions:
            session.send(item)
        self.metrics.presence_diffs_total += 1
        self.metrics.presence_deliveries_total += len(sessions)

    def _catch_up(self, channels: list[bytes]) -> None:
        """Channels subscribed again after an interruption: read what they missed."""
        if any(channel.endswith(b":presence") for channel in channels):
            self.presence.reread_all()
        for channel in channels:
            feed = self.hub.feeds.get(self.keys.project_of_channel(channel) or 0)
            if feed is not None and feed.channel == channel:
                self.hub.request_catch_up(feed)

    async def _every(self, interval: float, job) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = job()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:
                log.warning("periodic check failed", job=job.__name__, error=describe(exc))

    def cluster_masters(self) -> int:
        """The Redis Cluster masters this process may hold sockets to: those of its client's
        slot map, or of its pub/sub's (with the links it still keeps), whichever is more; 0 on a
        standalone Redis or before either map is loaded."""
        client = self.redis
        known = len(client.get_primaries()) if isinstance(client, RedisCluster) else 0
        if isinstance(self.link, ClusterPubSub):
            known = max(known, self.link.masters)
        return known

    def fit_to_masters(self) -> None:
        """On Redis Cluster, lower the admission bound (``--max-connections``, already fitted to
        the descriptor limit for a standalone Redis by ``gateway.__main__``) so that the sockets
        this process may hold to each master (:data:`~gateway.descriptors.REDIS_SOCKETS_PER_MASTER`)
        fit the descriptor limit too; run at start and every second, so that masters added
        later (a re-shard) lower it again, and masters removed give the room back, up to the
        configured bound. Connections already open stay: new ones are refused until the pod is
        below the new bound. Nothing on a standalone Redis."""
        masters = self.cluster_masters()
        if masters == self.fitted_masters:
            return
        self.fitted_masters = masters
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY or limit < 0:
            return
        fitted = fitted_connections(self.config.max_connections, ACCEPT_SLACK, limit, masters)
        current = self.admission.max_connections
        if fitted == current:
            return
        self.admission.max_connections = fitted
        fields = {
            "configured": self.configured_connections,
            "effective": fitted,
            "descriptor_limit": limit,
            "masters": masters,
            "sockets_per_master": REDIS_SOCKETS_PER_MASTER,
        }
        if fitted < current:
            log.warning(
                "max_connections lowered to fit the descriptor limit with every Redis Cluster "
                "master's sockets",
                **fields,
                hint=LIMIT_HINT,
            )
        else:
            log.info("max_connections raised: fewer Redis Cluster masters", **fields)

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions):
            if session.check_stall(now):
                self.metrics.slow_consumer_disconnects_total += 1

    async def _sync_group(self) -> None:
        """Publish this worker's counters, gauges and readiness to the group (once a second)."""
        assert self.group is not None
        self.ready_now = all((await self.readiness()).values())
        self.group.sync(self.ready_now)

    async def readiness(self) -> dict[str, bool]:
        """The checks of ``/readyz``: Redis answers a ``PING`` within :data:`READINESS_TIMEOUT`,
        the pub/sub link is up, the pod is not draining, and (when revocations are checked) the
        revocation list has been read once since start: a pod that could not read it yet would
        take revoked tokens (it keeps its last list when Redis fails later, and stays ready).

        ``/readyz`` is on the public port, so anyone can ask it at any rate: checks made while a
        ``PING`` is in flight share it (it ends within the timeout whoever waits for it, and a
        client that leaves does not cancel it for the others). A ``PING`` per request held a
        connection of the pool the history reads use (redis-py's, 100) each: a burst of probes
        took the pool, and the polls and subscribes made meanwhile failed ``unavailable``.
        """
        redis_ok = await self._ping()
        checks = {
            "redis": redis_ok,
            "pubsub": self.link.serving,
            "not_draining": not self.draining,
        }
        if self.revocations is not None:
            checks["revocations"] = self.revocations.loaded.is_set()
        return checks

    async def _ping_redis(self) -> bool:
        # Bounded by the store, per master on a Redis Cluster, so that the answers are counted.
        return await self.store.ping(READINESS_TIMEOUT)

    # --- clients' mistakes -------------------------------------------------------------------

    def bad_request(self, message: str) -> Response:
        """A malformed request (the client's mistake): 400, counted, logged a few times a minute."""
        return self._refused(400, "bad_request", message, "bad request")

    def bad_handshake(self, status: int, error: Exception | None, refused: Headers) -> Response:
        """websockets refused a handshake (the client's mistake: 400, or 426 for one without a
        valid ``Upgrade``/``Connection``): its status, with the gateway's JSON answer and the
        headers that tell the client what to send (websockets' ``Upgrade: websocket``; RFC 6455's
        ``Sec-WebSocket-Version: 13`` for another version), counted with the malformed requests,
        logged a few times a minute."""
        message = str(error) if error is not None else "malformed WebSocket handshake"
        headers = [("Upgrade", value) for value in refused.get_all("Upgrade")]
        if isinstance(error, InvalidHeaderValue) and error.name == "Sec-WebSocket-Version":
            headers.append(("Sec-WebSocket-Version", "13"))
        return self._refused(status, "bad_request", message, "bad handshake", headers)

    def request_too_large(self, message: str, status: int = 431) -> Response:
        """A request over a bound of its head (the client's mistake): 431 (414 for the request
        line), counted with the malformed ones, logged a few times a minute."""
        return self._refused(status, "request_too_large", message, "request too large")

    def _refused(
        self,
        status: int,
        error: str,
        message: str,
        event: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """A request refused for the client's mistake: counted in ``bad_requests_total``,
        logged (throttled per ``error``), answered ``{"error": error, "message": message}``."""
        self.metrics.bad_requests_total += 1
        self.client_log(event, kind=error, message=message)
        return json_response(status, {"error": error, "message": message}, headers)

    def client_log(self, event: str, *, kind: str, **fields) -> None:
        """Log a line caused by a client at info level, throttled per ``kind``."""
        self.client_log_throttle.log(kind, log.info, event, **fields)

    # --- connections -------------------------------------------------------------------------

    def add_session(self, session: ClientSession) -> None:
        """A client connection (any transport) is open: count it for metrics and drain."""
        self.sessions[session] = None
        self._all_closed.clear()
        self.metrics.connections_accepted_total += 1

    def subject_changed(
        self, session: ClientSession, previous: str | None, subject: str | None
    ) -> None:
        """An open session's token (first or refreshed) has ``subject`` as its ``sub`` now,
        instead of ``previous``: the subject index of the revocations follows."""
        if self.revocations is not None and session in self.sessions:
            self.revocations.subject_changed(session, previous, subject)

    def remove_session(self, session: ClientSession) -> None:
        """A client connection closed: drop its subscriptions, presence and expiry timer."""
        self.hub.remove(session)
        self.presence.close_session(session)
        self.sessions.pop(session, None)
        if self.revocations is not None:
            self.revocations.forget(session)
        if not self.sessions:
            self._all_closed.set()
        self.clients.expiry.remove(session, session.expiry)
        session.expiry = None

    def answer_started(self, bound: asyncio.Timeout) -> None:
        """An HTTP request is being handled (gateway.http), under ``bound``."""
        self.http_answers.add(bound)
        self._answers_done.clear()

    def answer_ended(self, bound: asyncio.Timeout) -> None:
        """Its handler returned (the answer is written next, in the same step) or was ended."""
        self.http_answers.discard(bound)
        if not self.http_answers:
            self._answers_done.set()

    def answer_written(self, transport: asyncio.WriteTransport) -> None:
        """An HTTP answer was written to ``transport`` (it may not be sent yet)."""
        self.http_sending.add(transport)

    def answer_closed(self, transport: asyncio.WriteTransport) -> None:
        """The connection of an HTTP answer ended (sent or not, nothing more goes out)."""
        self.http_sending.discard(transport)

    def answers_unsent(self) -> int:
        """How many HTTP answers written are not wholly sent yet (:func:`unsent`: bytes still in
        the transport's buffer or the kernel's)."""
        return sum(1 for transport in self.http_sending if unsent(transport))

    async def _answers_sent(self) -> None:
        """Until every HTTP answer written is sent, or its connection ended."""
        while self.answers_unsent():  # noqa: ASYNC110 - unsent() is no event to wait for
            await asyncio.sleep(SENDING_CHECK_INTERVAL)

    def cut_answers(self) -> int:
        """End every HTTP request still being handled: each is answered 503 ``draining`` (with
        ``Retry-After``) instead, as its task's next step. Returns how many."""
        now = asyncio.get_running_loop().time()
        bounds = [bound for bound in self.http_answers if not bound.expired()]
        for bound in bounds:
            bound.reschedule(now)
        self.metrics.connections_rejected_total += len(bounds)
        return len(bounds)

    # --- shutdown ----------------------------------------------------------------------------

    async def drain(self) -> None:
        """SIGTERM: not ready, stop accepting, close clients with 1012 in batches, then stop.

        From the start, a new handshake, stream or poll is refused (503, ``Retry-After``). HTTP
        requests already being handled (a poll waiting for Redis) are answered as usual,
        within ``--drain-timeout`` like the clients' closes; one still waiting then is answered
        503 ``draining`` (:meth:`cut_answers`), so the drain never waits longer for it. HTTP
        answers written but not wholly sent yet (a page to a slow reader) are waited for within
        the same deadline, so the exit does not cut them; one still unsent then is cut."""
        if self.draining:
            return
        self.draining = True
        config = self.config
        started = time.monotonic()
        log.info("draining", connections=len(self.sessions), timeout=config.drain_timeout)
        if config.drain_delay:
            await asyncio.sleep(config.drain_delay)
        if self.server is not None:
            self.server.close()  # the listening socket only: clients are closed below
        # Presence first: this pod's members stay listed for the grace while their clients
        # reconnect elsewhere, so nobody appears to leave and join again.
        await _bounded(self.presence.drain(), "presence")
        sessions = list(self.sessions)
        batches = [
            sessions[i : i + config.drain_batch]
            for i in range(0, len(sessions), config.drain_batch)
        ]
        # Spread the reconnect storm over half the drain budget, at most 1 s between batches.
        pause = min(1.0, config.drain_timeout / 2 / max(1, len(batches)))
        for index, batch in enumerate(batches):
            if index:
                await asyncio.sleep(pause)
            for session in batch:
                session.close_later(CloseCode.SERVICE_RESTART, "server restarting")
        deadline = started + config.drain_timeout
        if self.sessions or self.http_answers or self.http_sending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(
                    asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
                ):
                    if self.sessions:
                        await self._all_closed.wait()
                    await self._answers_done.wait()
                    await self._answers_sent()
        for session in list(self.sessions):
            session.transport.abort()
        cut = self.cut_answers()
        if cut:
            # Their tasks write the 503s in their next step (a few loop iterations at most).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CUT_ANSWERS_TIMEOUT):
                    await self._answers_done.wait()
        unsent_answers = self.answers_unsent()  # cut by the exit (the deadline has passed)
        await self.close()
        extra = {"requests_cut": cut} if cut else {}
        if unsent_answers:
            extra["answers_unsent"] = unsent_answers
        log.info("drained", seconds=round(time.monotonic() - started, 3), **extra)

    async def close(self) -> None:
        """Stop everything; each step is bounded by CLOSE_STEP_TIMEOUT (Redis may hang)."""
        for task in self._tasks:
            task.cancel()
        self._ping.cancel()  # (a readiness check still waiting on it gets CancelledError)
        self.keepalive.close()
        self.clients.expiry.close()
        if self.revocations is not None:
            await _bounded(self.revocations.stop(), "revocations")
        await _bounded(self.presence.stop(), "presence")
        if self.streams.keepalive is not None:
            self.streams.keepalive.close()
        if self.server is not None:
            self.server.close()
            await _bounded(self.server.wait_closed(), "listener")
        await _bounded(self.hub.close(), "feeds")
        await _bounded(self.link.close(), "pubsub")
        if self.redis is not None:
            await _bounded(self.redis.aclose(), "redis")
        if self.group is not None:
            self.group.close()


async def _bounded(step, name: str) -> None:
    try:
        async with asyncio.timeout(CLOSE_STEP_TIMEOUT):
            await step
    except TimeoutError:
        log.warning("shutdown step timed out", step=name, timeout=CLOSE_STEP_TIMEOUT)
    except Exception as exc:
        log.warning("shutdown step failed", step=name, error=describe(exc))


def redis_client(url: str) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """The client every Redis call of the gateway goes through (history reads, presence,
    readiness): with a server that accepts connections and never answers, a call fails after one
    read timeout (5 s; redis-py's nested retries cost 84 s before), and no call outlasts
    ``REDIS_CALL_TIMEOUT``; quick failures (a refused connection while Redis restarts, a
    Cluster failover) are still retried within that time (:func:`redisconn.async_client`). On
    Redis Cluster it holds at most :data:`~gateway.descriptors.NODE_CONNECTIONS` connections to
    each master: what the descriptor budget counts (:meth:`Gateway.fit_to_masters`)."""
    return async_client(url, call_timeout=REDIS_CALL_TIMEOUT, node_connections=NODE_CONNECTIONS)


def _close_revoked(session: ClientSession) -> None:
    """An open connection whose token the revocation list now refuses (gateway.revocations)."""
    session.close_later(CloseCode.TOKEN_REVOKED, "token revoked")


def _keepalive_timeout(session: ClientSession) -> None:
    session.abort(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


def event_loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which event loop runs the gateway (logged at start)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _redact(url: str) -> str:
    """``url`` with everything up to its last '@' after the scheme hidden: a password's own
    unencoded '@' (which redis-py reads, as urllib takes the netloc's last '@') left the rest of
    it shown when the cut was at the first."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


async def run(config: GatewayConfig, *, configured_connections: int | None = None) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP, then drain.

    SIGHUP drains too (its default action ended the process at once, cutting every client
    without a close frame: ``kill -HUP``, a reload elsewhere, the terminal of a foreground
    gateway closing); there is no configuration to reload. Unless it was ignored when the
    process started (``nohup``; a ``--workers`` worker, whose supervisor decides): then it
    stays ignored. SIGTERM and SIGINT drain even when ignored at the start (a worker's SIGINT,
    sent to it alone), and are ignored again once the drain is over (:func:`_ignore_again`)."""
    gateway = Gateway(config, configured_connections=configured_connections)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)

    def on_stop_signal(received: signal.Signals) -> None:
        if not stop.is_set():
            log.info("stop signal", signal=received.name)
        stop.set()

    ignored = [sig for sig in signals if signal.getsignal(sig) is signal.SIG_IGN]
    for sig in signals:
        loop.add_signal_handler(sig, on_stop_signal, sig)
    await stop.wait()
    try:
        await gateway.drain()
    finally:
        _ignore_again(loop, ignored)


def _ignore_again(loop: asyncio.AbstractEventLoop, signals: list[signal.Signals]) -> None:
    """Ignore ``signals`` again, those ignored when the process started (a ``--workers``
    worker's SIGINT), now that the drain is over.

    asyncio gives a signal it handled Python's default handler back when the loop closes, not
    what the signal was before (SIGINT: KeyboardInterrupt): a Ctrl-C pressed again as a group
    stopped reached a worker in its last milliseconds, after its drain, and it died of it (a
    traceback in the group's output; the supervisor logged ``worker exited during the stop``,
    code -2, and exited 1). Blocked meanwhile: one that comes between the steps is dropped."""
    if not signals:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)  # (a pending one is discarded)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
