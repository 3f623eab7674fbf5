"""The pure core of the HTTP publish API: credentials, rate limits, routes, request bodies and
queries, answers.

Nothing here does I/O, so every rule is unit tested without a socket (``tests/test_http_api.py``).
The ASGI application in :mod:`publisher.http_api.app` is a thin layer that reads the request,
asks these functions, publishes, and writes the answer.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.events import (
    TOO_DEEP,
    EventValidationError,
    NumberOutOfRange,
    ProjectEvent,
    decode_event,
    repeated_key,
)
from schemas.history import PollQuery, parse_poll_query
from schemas.protocol import Epoch, Member, PollResponse, Presence, Sequence, encode
from schemas.revocations import Revocation

__all__ = [
    "ApiError",
    "ApiKey",
    "ApiKeyFile",
    "Credentials",
    "ErrorAnswer",
    "ErrorInfo",
    "EventCursor",
    "Health",
    "Published",
    "PublishedBatch",
    "RateLimiter",
    "Readiness",
    "RevocationAnswer",
    "RevocationRequest",
    "TokenBucket",
    "cursor_body",
    "error_body",
    "hash_key",
    "history_body",
    "new_key",
    "parse_events",
    "parse_history_query",
    "parse_presence_query",
    "parse_project_path",
    "parse_revocation",
    "parse_route",
    "presence_body",
    "revocation_body",
]

#: A key as handed to a service: a fixed prefix (so a leaked key is recognisable in logs and by
#: secret scanners) and 32 random bytes, URL-safe base64.
KEY_PREFIX = "ebk_"
_PATH_RE = re.compile(r"/v1/projects/([1-9][0-9]{0,15})/(events|presence)")  # one spelling of an id
#: The resources of a project: its events (POST publishes, GET reads a page of its history) and
#: its presence (GET).
EVENTS = "events"
PRESENCE = "presence"
#: ``POST`` here revokes a subject's tokens (keys with ``"revoke": true`` only).
REVOCATIONS_PATH = "/v1/revocations"
#: ``GET`` here answers the API's OpenAPI document (:mod:`publisher.http_api.openapi`), no key.
OPENAPI_PATH = "/openapi.json"
#: Set (True) in a request's ASGI scope by the server when it answered the request itself (a
#: 400/431 for a body that broke off): the application's own outcome goes nowhere, and is not
#: counted beside the server's.
REFUSED_SCOPE_KEY = "eventbus.refused"
#: Largest body of a revocation request: a subject is at most 1 KiB (MAX_SUBJECT_BYTES), so
#: anything near this is not one (and is refused before it is all read).
MAX_REVOCATION_BODY = 16 * 1024


class ApiError(Exception):
    """A request the API refuses: ``status`` and a stable ``code`` (see docs/http-publish.md)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        cursors: list | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        #: An array partly written (its events under an Idempotency-Key are separate script
        #: calls): each event's cursor, None for those not written.
        self.cursors = cursors


class ApiKey(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One publisher credential, as stored in the keys file. The key itself is never stored:
    only its SHA-256, so a leaked file does not leak a working key. An unknown field is an
    error, not ignored: a misspelt ``rate`` or ``projects`` must not pass unnoticed."""

    id: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+\Z")]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
    #: The projects it may publish to, and read the presence and history of: ids, or ``"*"``.
    #: Empty only for a key that revokes and publishes nowhere (least privilege for an accounts
    #: service).
    projects: list[Annotated[int, Meta(gt=0, le=2**53 - 1)]] | Literal["*"]
    rate: Annotated[float, Meta(gt=0)] | None = None
    burst: Annotated[int, Meta(ge=1)] | None = None
    #: Whether this key may revoke tokens (``POST /v1/revocations``): an operator's power over
    #: every person's access, so only keys given it (``new-key --may-revoke``) have it.
    revoke: bool = False

    def __post_init__(self) -> None:
        if self.rate is not None and not math.isfinite(self.rate):
            raise ValueError("a key's rate must be a finite number of events per second")
        if not self.projects and not self.revoke:
            # (msgspec reports it with the entry's place in the file)
            raise ValueError('a key with no projects could do nothing (unless "revoke": true)')

    def allows(self, project_id: int) -> bool:
        return self.projects == "*" or project_id in self.projects


class ApiKeyFile(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The keys file: ``{"keys": [{"id": ..., "sha256": ..., "projects": [1, 2] | "*"}]}``
    (each key may also have ``rate``, ``burst`` and ``revoke``)."""

    keys: list[ApiKey]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (show it once; store only :func:`hash_key` of it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Credentials:
    """The configured keys, looked up by the hash of the presented bearer key.

    Hashing first makes the lookup independent of how much of a guess matches (no timing
    oracle on the key), and the file holds only hashes.
    """

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        for key in keys:
            if key.sha256 in self._by_hash:
                raise ValueError(f"keys {self._by_hash[key.sha256].id!r} and {key.id!r} are equal")
            self._by_hash[key.sha256] = key
        if len({key.id for key in self._by_hash.values()}) != len(self._by_hash):
            raise ValueError("key ids must be unique")

    @classmethod
    def from_json(cls, data: bytes | str) -> Credentials:
        """Parse a keys file; raises ``ValueError`` naming the offending field."""
        try:
            parsed = msgspec.json.decode(data, type=ApiKeyFile)
        except msgspec.DecodeError as exc:
            raise ValueError(f"invalid keys file: {exc}") from None
        return cls(parsed.keys)

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key named by an ``Authorization: Bearer <key>`` header, or ApiError 401."""
        if not authorization:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <api key>")
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "unauthorized", "expected Authorization: Bearer <api key>")
        digest = hash_key(presented)
        key = self._by_hash.get(digest)
        # compare_digest on the hash: the dict lookup already found it; this keeps the final
        # comparison constant-time should the table ever be replaced by a scan.
        if key is None or not hmac.compare_digest(key.sha256, digest):
            raise ApiError(401, "unauthorized", "unknown API key")
        return key


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. Pure: the caller passes the time."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, count: int, now: float) -> float:
        """Take ``count`` tokens and return 0, or return the seconds until they would be there
        (nothing is taken then). A request larger than ``burst`` can never pass."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if count <= self.tokens:
            self.tokens -= count
            return 0.0
        if count > self.burst:
            return float("inf")
        return (count - self.tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per credential; each event costs one token, and so does each
    read (presence, a page of history) and each revocation."""

    def __init__(self, default_rate: float, default_burst: int) -> None:
        self.default_rate = default_rate
        self.default_burst = default_burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: ApiKey, events: int, now: float) -> None:
        """Charge ``events`` to ``key`` or raise ApiError 429 with the seconds to wait."""
        bucket = self._buckets.get(key.id)
        if bucket is None:
            rate = key.rate or self.default_rate
            burst = key.burst or max(self.default_burst, int(rate))
            bucket = self._buckets[key.id] = TokenBucket(rate, burst, now)
        wait = bucket.take(events, now)
        if wait == float("inf"):
            raise ApiError(
                429,
                "rate_limited",
                f"{events} events exceed this key's burst of {bucket.burst}: split the request",
            )
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {bucket.rate:g} events/s for key {key.id!r}",
                retry_after=wait,
            )


def parse_route(path: str) -> tuple[int, str]:
    """The project id and resource (:data:`EVENTS` or :data:`PRESENCE`) of
    ``/v1/projects/{id}/events`` or ``/v1/projects/{id}/presence``, or ApiError 404."""
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise ApiError(
            404,
            "not_found",
            "the endpoints are POST and GET /v1/projects/{id}/events, "
            f"GET /v1/projects/{{id}}/presence and POST {REVOCATIONS_PATH}",
        )
    project_id = int(match.group(1))
    if not 0 < project_id <= 2**53 - 1:
        raise ApiError(404, "not_found", "project ids are positive integers")
    return project_id, match.group(2)


def parse_project_path(path: str) -> int:
    """The project id of ``/v1/projects/{id}/events``, or ApiError 404."""
    project_id, resource = parse_route(path)
    if resource != EVENTS:
        raise ApiError(404, "not_found", "expected /v1/projects/{id}/events")
    return project_id


def _query_text(query_string: bytes) -> str:
    # The raw query as the client sent it; what is not ASCII is not percent-encoded, so no
    # parameter of ours can hold it.
    try:
        return query_string.decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_query", "the query is not ASCII (percent-encode it)") from None


def parse_history_query(query_string: bytes) -> PollQuery:
    """The query of ``GET /v1/projects/{id}/events``: the gateway's poll query
    (``epoch=&after=&tag=&limit=``, :func:`schemas.history.parse_poll_query`), or ApiError 400
    ``invalid_query`` naming the parameter (unknown, repeated, out of range, malformed)."""
    try:
        return parse_poll_query(_query_text(query_string))
    except ValueError as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None


def parse_presence_query(query_string: bytes) -> None:
    """``GET /v1/projects/{id}/presence`` takes no parameter: ApiError 400 for any (a client
    that sends one expects it to mean something, and nothing would)."""
    if query_string:
        raise ApiError(400, "invalid_query", "the presence endpoint takes no query parameters")


def presence_body(project_id: int, members: list[Member]) -> bytes:
    """The gateway's ``presence`` message: ``{"type": "presence", "project_id": ...,
    "members": [{"id", "name", "viewing", "answering", "since"}, ...]}``, sorted by id."""
    return encode(Presence(project_id=project_id, members=members))


def history_body(page: PollResponse) -> bytes:
    """The gateway's poll answer (:class:`schemas.protocol.PollResponse`), events as stored."""
    return encode(page)


def _decoded(body: bytes) -> object:
    """The JSON document of a request body; ApiError 400 ``invalid_json`` when it is not JSON
    or nested too deeply to decode."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", TOO_DEEP) from None


def _refuse_repeated_keys(body: bytes) -> None:
    """ApiError 400 ``repeated_key`` when one object of the body gives a key twice (the decoded
    dict kept one of them, silently), ``invalid_json`` when it is nested too deeply to check."""
    try:
        key = repeated_key(body)
    except EventValidationError as exc:
        raise ApiError(400, "invalid_json", str(exc)) from None
    if key is not None:
        raise ApiError(400, "repeated_key", f"the key {key!r} is given twice in one object")


#: What :func:`_first_repeated_key` answers for JSON too deep to check for repeated keys.
_TOO_DEEP = object()


def _first_repeated_key(body: bytes) -> str | object | None:
    """:func:`repeated_key` of ``body`` (:data:`_TOO_DEEP` when it is nested too deeply to
    check), whose every number is read too: ApiError 400 ``invalid_json`` for one msgspec does
    not decode, wherever it is. msgspec skips the values it does not decode (an event's unknown
    fields) without reading their numbers; when it decoded everything, such a number refused the
    whole body, whatever else was wrong with it (a repeated key, too many events)."""
    try:
        return repeated_key(body, numbers=True)
    except NumberOutOfRange:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except EventValidationError:  # (too deep to check)
        pass
    # Too deep to check, a few levels less deep than msgspec decodes: the numbers past that
    # depth are read by msgspec (the old price, for such bodies only).
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", TOO_DEEP) from None
    return _TOO_DEEP


def parse_events(body: bytes, project_id: int, max_events: int) -> tuple[list[ProjectEvent], bool]:
    """Decode a request body into validated events of ``project_id``.

    The body is one event object or a JSON array of them (``bool`` in the result says which).
    An event may omit ``project_id`` (the path names it); one that names another project is
    refused. Raises ApiError 400 (not JSON, a key given twice in one object, wrong shape), 413
    (too many events) or 422 (an event breaks the contract: the message names the index and the
    field).

    What a body costs is bounded by its length, not by what it holds: an event's fields the
    contract does not know (ignored) are skipped by msgspec without becoming Python objects, and
    the one pass that must read all of them, the repeated-key check (which also refuses a number
    msgspec would not have decoded, as it did when it decoded them all), runs with the cyclic
    garbage collector paused. A 5 MB event of a million tiny unknown arrays took about a second
    of the event loop (several collections over the millions of objects the decoders built);
    now ~0.1 s (docs/http-publish.md).
    """
    # The collector off while the parse builds nothing but acyclic, short-lived objects
    # (refcounting frees them): its generations, filled by a body's millions of values, made it
    # run again and again over them, most of a large body's cost. The parse never awaits, so no
    # other task's work runs in the pause. Paused inside the ``try`` (and restored only if it
    # was on): an exception raised as ``gc.disable()`` returns (a KeyboardInterrupt, as a
    # signal raises it) must not leave it off for the rest of the process's life.
    enabled = gc.isenabled()
    try:
        gc.disable()
        _check_document(body)
        is_batch = _first_byte(body) == b"["
        items: list[bytes | msgspec.Raw] = _ITEMS.decode(body) if is_batch else [body]
        if not items:
            raise ApiError(400, "invalid_body", "an empty array publishes nothing")
        # A number msgspec cannot read refuses the body before its count (msgspec decoded all
        # of it first); JSON too deep to check its keys after it (the check came then).
        key = _first_repeated_key(body)
        if len(items) > max_events:
            raise ApiError(
                413, "too_many_events", f"at most {max_events} events per request, got {len(items)}"
            )
        if key is _TOO_DEEP:
            raise ApiError(400, "invalid_json", TOO_DEEP)
        if key is not None:
            raise ApiError(400, "repeated_key", f"the key {key!r} is given twice in one object")
        events: list[ProjectEvent] = []
        for index, item in enumerate(items):
            where = f"event {index}: " if is_batch else ""
            try:
                # (The body's keys were checked above: an event's own bytes repeat none.)
                events.append(
                    decode_event(_with_project(item, project_id, where), keys_checked=True)
                )
            except EventValidationError as exc:
                raise ApiError(422, "invalid_event", f"{where}{exc}") from None
        return events, is_batch
    finally:
        if enabled:
            gc.enable()


#: An array body's events, each as its own bytes (validated JSON, never decoded to objects).
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


class _NamedProject(msgspec.Struct):
    """An event's ``project_id`` as sent (empty when it has none); its other fields skipped
    without building their names (a dict of them took 0.1-0.3 s for 300,000 unknown keys)."""

    project_id: msgspec.Raw = msgspec.Raw(b"")


_NAMED_PROJECT = msgspec.json.Decoder(_NamedProject)
#: The whole document as bytes: checks it is one JSON value (syntax, nesting, nothing after it).
_DOCUMENT = msgspec.json.Decoder(msgspec.Raw)
_SPACE = re.compile(rb"[ \t\r\n]*")


def _check_document(body: bytes) -> None:
    """ApiError 400 ``invalid_json`` unless ``body`` is one JSON value in UTF-8 (checked apart:
    msgspec skips what it does not decode without reading its strings' bytes)."""
    try:
        body.decode()
        _DOCUMENT.decode(body)
    except (UnicodeDecodeError, msgspec.DecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", TOO_DEEP) from None


def _first_byte(body: bytes) -> bytes:
    """The first byte of the JSON value in ``body`` (after its leading white space)."""
    start = _SPACE.match(body).end()  # type: ignore[union-attr]  (matches the empty string)
    return body[start : start + 1]


def _with_project(item: bytes | msgspec.Raw, project_id: int, where: str) -> bytes:
    """One event's JSON with its ``project_id``: the path's added when the event leaves it out;
    ApiError 422 when it is not an object or names another project."""
    try:
        named = _NAMED_PROJECT.decode(item).project_id
    except msgspec.ValidationError:
        raise ApiError(422, "invalid_event", f"{where}expected a JSON object - at `$`") from None
    if named:
        value = msgspec.json.decode(named)
        if value != project_id:
            raise ApiError(
                422,
                "invalid_event",
                f"{where}project_id {value!r} differs from the path's {project_id} - "
                "at `$.project_id`",
            )
        return bytes(item)
    data = bytes(item)
    rest = data[data.index(b"{") + 1 :]
    after_space = _SPACE.match(rest).end()  # type: ignore[union-attr]  (matches the empty string)
    separator = b"" if rest[after_space : after_space + 1] == b"}" else b","
    return b'{"project_id":%d%s%s' % (project_id, separator, rest)


class RevocationRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The body of ``POST /v1/revocations``: the arguments of ``revoke_tokens`` (whole unix
    seconds and seconds; None: the publisher's default, now and 24 hours). Their ranges
    (a time that has passed, ``keep_for`` up to 366 days) are the publisher's to check."""

    subject: Annotated[str, Meta(min_length=1)]
    issued_before: Annotated[int, Meta(ge=0, le=2**53 - 1)] | None = None
    keep_for: Annotated[int, Meta(gt=0, le=2**53 - 1)] | None = None


def parse_revocation(body: bytes) -> RevocationRequest:
    """Decode the body of a revocation request. Raises ApiError 400 (not JSON, a key given
    twice) or 422 (not an object of those fields: the message names the field)."""
    document = _decoded(body)
    _refuse_repeated_keys(body)
    try:
        return msgspec.convert(document, RevocationRequest)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_revocation", str(exc)) from None


class EventCursor(msgspec.Struct):
    """Where an event was written: its history's ``epoch`` and its number ``seq`` in it (the
    cursor a consumer resumes after)."""

    epoch: Epoch
    seq: Sequence


class Published(msgspec.Struct):
    """The answer to one published event (or an idempotent retry of it)."""

    cursor: EventCursor


class PublishedBatch(msgspec.Struct):
    """The answer to an array of events: their cursors, in the array's order."""

    cursors: list[EventCursor]


class ErrorInfo(msgspec.Struct):
    """What was refused: a stable ``code`` (docs/http-publish.md) and a message for people."""

    code: str
    message: str


class ErrorAnswer(msgspec.Struct, omit_defaults=True):
    """Every refusal's body. ``cursors`` only for an array with an ``Idempotency-Key`` that was
    partly written (409, 502): each event's cursor, ``null`` for those not written."""

    error: ErrorInfo
    cursors: list[EventCursor | None] | None = None


class RevocationAnswer(msgspec.Struct):
    """The answer to a revocation: the subject's entry after the merge (unix seconds)."""

    revocation: Revocation


class Health(msgspec.Struct):
    """``GET /healthz``: the process is up."""

    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, omit_defaults=True):
    """``GET /readyz``: whether Redis answered ``PING`` in time; ``redis`` says what went wrong
    when not."""

    ready: bool
    redis: str | None = None


def revocation_body(revocation: Revocation) -> bytes:
    """``{"revocation": {"subject": ..., "issued_before": ..., "expires_at": ...}}``."""
    return msgspec.json.encode(RevocationAnswer(revocation))


def cursor_body(cursors: list, is_batch: bool) -> bytes:
    """``{"cursor": {...}}`` for one event, ``{"cursors": [...]}`` for an array."""
    encoded = [EventCursor(c.epoch, c.seq) for c in cursors]
    if is_batch:
        return msgspec.json.encode(PublishedBatch(encoded))
    return msgspec.json.encode(Published(encoded[0]))


def error_body(error: ApiError) -> bytes:
    cursors = None
    if error.cursors is not None:
        cursors = [None if c is None else EventCursor(c.epoch, c.seq) for c in error.cursors]
    return msgspec.json.encode(ErrorAnswer(ErrorInfo(error.code, error.message), cursors))


def header(headers: Mapping[bytes, list[bytes]], name: bytes) -> str | None:
    """One header's value, or ApiError 400 when it is repeated (which value would count?)."""
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "repeated_header", f"the {name.decode()} header is repeated")
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_header", f"the {name.decode()} header is not ASCII") from None
