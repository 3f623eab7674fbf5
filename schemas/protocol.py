"""The wire protocol between browsers and the gateway (documented in ``docs/protocol.md``).

Client frames are JSON text frames decoded into :data:`ClientMessage`; gateway frames are the
events themselves (the contract's JSON plus ``"seq"``) and the control messages below. Close codes
live in :class:`CloseCode`, error codes in :class:`ErrorCode`, resync reasons in
:class:`ResyncReason`: one home each.
"""

from __future__ import annotations

import enum
from typing import Annotated, TypeAlias, Union, get_args

import msgspec
from msgspec import Meta

from schemas.tags import TAG_PATTERN

__all__ = [
    "MAX_SEQ",
    "PROTOCOL_TYPES",
    "Activity",
    "Auth",
    "Authenticated",
    "ClientMessage",
    "CloseCode",
    "Error",
    "ErrorCode",
    "Member",
    "Ping",
    "PollResponse",
    "Pong",
    "Presence",
    "PresenceDiff",
    "PresenceGet",
    "ProtocolError",
    "ResyncReason",
    "ResyncRequired",
    "ServerMessage",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "decode_client_message",
    "encode",
]

#: The largest sequence number (a cursor's, an event's): exact in every client's numbers (a
#: JavaScript number is an integer exactly up to here). Every transport refuses a cursor beyond it.
MAX_SEQ = 2**53 - 1

ProjectId = Annotated[int, Meta(gt=0, le=2**53 - 1)]
Sequence = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
#: ``(?!\n)``: msgspec searches the pattern with Python's ``re``, whose ``$`` also matches before
#: a final line feed (``\Z`` would say it in Python only: the pattern is exported to JSON Schema).
Epoch = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+(?!\n)$")]
#: The tag of the event at a cursor (schemas.tags): 16 lowercase hex digits.
Tag = Annotated[str, Meta(min_length=16, max_length=16, pattern=TAG_PATTERN)]
Token = Annotated[str, Meta(min_length=1, max_length=8192)]
#: What a member is looking at or answering: an application id (a blocker's id in the dashboard).
ItemId = Annotated[int, Meta(gt=0, le=2**53 - 1)]


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses. 4000-4999 are private to this protocol."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    #: The pod is draining (SIGTERM); reconnect (to another pod) and resume from your cursors.
    SERVICE_RESTART = 1012
    #: The gateway cannot check tokens yet (it has not read the revocation list since it
    #: started: Redis is slow or unreachable): reconnect with backoff; nothing is wrong with
    #: the token.
    TRY_AGAIN_LATER = 1013
    #: No valid ``auth`` message in time, or the token is invalid. Get a new token, then reconnect.
    AUTH_FAILED = 4001
    #: The token expired and was not refreshed in-band. Get a new token, then reconnect.
    TOKEN_EXPIRED = 4002
    #: The token was revoked (schemas.revocations: its subject's tokens issued before a time are
    #: refused). Get a new token, then reconnect (with backoff: an app that removed the
    #: person's access gives none).
    TOKEN_REVOKED = 4003
    #: The client did not read fast enough; its outbound buffer passed the limit. Reconnect and
    #: resume from your cursors: nothing is lost.
    SLOW_CONSUMER = 4008
    #: Too many malformed frames in a row; the client is misbehaving.
    TOO_MANY_ERRORS = 4009
    #: The client kept sending frames while they were refused with ``rate_limited`` (more than
    #: ``--client-burst`` refusals net of ``--client-rate``): reconnect with backoff, and send
    #: less (a loop in the client is the usual cause).
    TOO_MANY_REQUESTS = 4029


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` message. The connection stays usable after every one of them.

    There is no "not authenticated" error: before a successful ``auth`` every frame that is not a
    valid ``auth`` closes the connection with :attr:`CloseCode.AUTH_FAILED` (4001).
    """

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    INVALID_CURSOR = "invalid_cursor"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    NOT_SUBSCRIBED = "not_subscribed"
    UNAVAILABLE = "unavailable"
    #: The connection sent frames faster than ``--client-rate`` per second (after a burst of
    #: ``--client-burst``): this frame was not executed (its ``project_id`` is the frame's, when
    #: it has one). Send it again after a delay (the message says the limit); a client that
    #: keeps sending while refused is closed with :attr:`CloseCode.TOO_MANY_REQUESTS`.
    #: ``unsubscribe`` and ``ping`` are never refused (they are executed over the limit too).
    RATE_LIMITED = "rate_limited"


class ResyncReason(enum.StrEnum):
    """Why a cursor could not be honoured; the client must reload state from its API."""

    #: The project's history was recreated (Redis flushed or restarted without persistence).
    EPOCH_CHANGED = "epoch_changed"
    #: Retention trimmed events the client has not seen.
    HISTORY_TRIMMED = "history_trimmed"
    #: More events were missed than one replay may carry.
    TOO_FAR_BEHIND = "too_far_behind"
    #: Redis lost events the gateway had already relayed (cursor ahead of the stream).
    HISTORY_LOST = "history_lost"
    #: An entry of the history is not an event the bus wrote (another writer to Redis, or
    #: corruption): it can never be delivered, so clients move past it.
    HISTORY_CORRUPT = "history_corrupt"


# --- client -> gateway ---------------------------------------------------------------------


class Auth(msgspec.Struct, tag_field="type", tag="auth"):
    """Authenticate (first frame), or refresh the token of an open connection before it expires."""

    token: Token


class Subscribe(msgspec.Struct, tag_field="type", tag="subscribe"):
    """Receive a project's events: live from now, or resumed after ``(epoch, after)``."""

    project_id: ProjectId
    epoch: Epoch | None = None
    after: Sequence | None = None
    #: The tag of the event at ``after`` (schemas.tags), when the client has it: a history that
    #: holds another event there (a Redis failover lost events) gets ``history_lost``.
    tag: Tag | None = None
    #: Also receive the project's member list (``presence``) and then its coalesced changes
    #: (``presence_diff``, at most one per second). See docs/presence.md.
    presence: bool = False


class Unsubscribe(msgspec.Struct, tag_field="type", tag="unsubscribe"):
    project_id: ProjectId


class Ping(msgspec.Struct, tag_field="type", tag="ping"):
    pass


class Activity(msgspec.Struct, tag_field="type", tag="activity"):
    """What this tab's person is doing in a project: the item on screen (``viewing``) and the
    item they are typing an answer to (``answering``); null for none. Replaces the tab's previous
    activity in that project."""

    project_id: ProjectId
    viewing: ItemId | None = None
    answering: ItemId | None = None


class PresenceGet(msgspec.Struct, tag_field="type", tag="presence_get"):
    """Ask for a project's member list once; answered with ``presence``."""

    project_id: ProjectId


ClientMessage: TypeAlias = Union[  # noqa: UP007
    Auth, Subscribe, Unsubscribe, Ping, Activity, PresenceGet
]
CLIENT_MESSAGE_TYPES = ("auth", "subscribe", "unsubscribe", "ping", "activity", "presence_get")


# --- gateway -> client ---------------------------------------------------------------------


class Authenticated(msgspec.Struct, tag_field="type", tag="authenticated"):
    """The token was accepted. ``projects`` is null when it allows every project."""

    subject: str | None
    projects: list[int] | None
    expires_at: int | None  # Unix seconds


class Subscribed(msgspec.Struct, tag_field="type", tag="subscribed"):
    """Sent after the replayed events (if any) and before any live event of the project.

    ``seq`` is the project's top sequence when the subscription went live. ``resumed`` is true when
    the client's cursor was honoured in full (``replayed`` events were re-sent). ``tag`` is the
    tag of the event at ``seq`` (None when ``seq`` is 0 or the gateway does not know it).
    """

    project_id: int
    epoch: str
    seq: int
    resumed: bool
    replayed: int = 0
    tag: str | None = None


class Unsubscribed(msgspec.Struct, tag_field="type", tag="unsubscribed"):
    project_id: int


class ResyncRequired(msgspec.Struct, tag_field="type", tag="resync_required"):
    """The cursor cannot be honoured: reload state from the application's API; later events
    continue after ``(epoch, seq)``."""

    project_id: int
    reason: ResyncReason
    epoch: str
    seq: int
    #: The tag of the event at ``seq`` (None when ``seq`` is 0 or unknown).
    tag: str | None = None


class Error(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    """``retry_after_ms``: only with ``rate_limited``, the milliseconds until the connection's
    rate limit would allow the refused frame (absent from gateways before it was added: a
    client then waits a delay of its own). ``refused``: only with ``rate_limited``, the
    ``type`` of the frame that was not executed (``subscribe``, ``activity``, ``auth``, ...;
    absent when the frame could not be read, and from gateways before it was added).
    ``ended``: only with ``unavailable``, true when the gateway itself ends the project's
    subscription (live or being made: its metadata in Redis became unreadable); absent
    otherwise, e.g. from the failed presence read after a ``subscribed``, which leaves the
    subscription standing, and from gateways before it was added."""

    code: ErrorCode
    message: str
    project_id: int | None = None
    retry_after_ms: int | None = None
    refused: str | None = None
    ended: bool = False


class Pong(msgspec.Struct, tag_field="type", tag="pong"):
    pass


class Member(msgspec.Struct, frozen=True):
    """One person present in a project, merged over all their tabs on all gateway pods.

    ``id`` is the token's ``sub``; ``name`` its optional ``name`` claim. ``viewing`` and
    ``answering`` are those of the tab that reported activity last. ``since`` is when the member
    became present (Unix milliseconds, the earliest of its tabs still open).
    """

    id: str
    name: str | None
    viewing: int | None
    answering: int | None
    since: int


class Presence(msgspec.Struct, tag_field="type", tag="presence"):
    """A project's full member list (answer to ``presence_get``, and first presence message of a
    ``subscribe`` with ``"presence": true``), sorted by ``id``."""

    project_id: int
    members: list[Member]


class PresenceDiff(msgspec.Struct, tag_field="type", tag="presence_diff"):
    """The changes since the previous ``presence``/``presence_diff`` of the project on this
    connection: apply ``left`` (ids to remove), then ``joined`` and ``changed`` (members to put,
    replacing any with the same id). At most one per project per second."""

    project_id: int
    joined: list[Member]
    left: list[str]
    changed: list[Member]


ServerMessage: TypeAlias = Union[  # noqa: UP007
    Authenticated,
    Subscribed,
    Unsubscribed,
    ResyncRequired,
    Error,
    Pong,
    Presence,
    PresenceDiff,
]

#: The ``type`` of every protocol message, a client's or the gateway's: no event type may take one
#: (a client tells events from control messages by ``type``; schemas.events refuses such a tag).
PROTOCOL_TYPES: frozenset[str] = frozenset(
    message.__struct_config__.tag for message in get_args(ClientMessage) + get_args(ServerMessage)
)


class PollResponse(msgspec.Struct):
    """Body of ``GET /v1/projects/{id}/events``: the HTTP polling fallback.

    ``events`` are the same frames a WebSocket subscriber gets (each with ``seq``), embedded
    without re-encoding. When ``resync_required`` is set, ``events`` is empty and the client
    reloads state, then polls again with ``after=seq``.
    """

    project_id: int
    epoch: str
    seq: int
    events: list[msgspec.Raw]
    resync_required: ResyncRequired | None = None
    more: bool = False
    #: The tag of the event at the cursor to poll with next: the last of ``events``, or, when
    #: there are none, the one at ``seq`` (None when unknown).
    tag: str | None = None


# --- codec ---------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A client frame that is not a valid protocol message; ``code`` says which way."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_client_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


def decode_client_message(data: bytes | str) -> ClientMessage:
    """Parse one client frame, raising :class:`ProtocolError` with a precise code and message."""
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.endswith("- at `$.type`") or text.endswith("missing required field `type`"):
            raise ProtocolError(
                ErrorCode.UNKNOWN_TYPE,
                f"{text}; expected one of {', '.join(CLIENT_MESSAGE_TYPES)}",
            ) from None
        if "$.epoch" in text or "$.after" in text or "$.tag" in text:
            raise ProtocolError(ErrorCode.INVALID_CURSOR, text) from None
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, text) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, str(exc)) from None


def encode(message: ServerMessage | PollResponse) -> bytes:
    """Encode a gateway message to JSON bytes."""
    return _encoder.encode(message)
