"""The OpenAPI 3.1 description of the HTTP API, for clients generated in any language.

Pure (no I/O): :func:`openapi_document` builds it from the msgspec types the API decodes and
encodes (the events of :mod:`schemas.events`, the gateway's poll answer and ``presence`` message,
the revocation request, the cursor and error bodies of :mod:`publisher.http_api.core`), so the
document cannot drift from the bytes the API sends. The limits that are settings
(:class:`~publisher.http_api.app.HttpApiSettings`) are those given: the API serves the document
of its own settings at ``GET /openapi.json``; ``eventbus-publish http-api openapi`` prints it
(the defaults: ``docs/openapi.json``).

Two answers belong to no operation, which OpenAPI has no place for: the 404 of a path the API
does not serve (``x-not-found`` at the top) and the 405 of a method a path does not serve
(``x-method-not-allowed`` on each path, with ``Allow``: the path's methods).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from publisher.core import MAX_KEEP_FOR
from publisher.http_api.core import (
    MAX_REVOCATION_BODY,
    OPENAPI_PATH,
    REVOCATIONS_PATH,
    ErrorAnswer,
    Health,
    Published,
    PublishedBatch,
    Readiness,
    RevocationAnswer,
    RevocationRequest,
)
from schemas.events import Event
from schemas.export import clean_descriptions
from schemas.history import DEFAULT_POLL_LIMIT, MAX_POLL_LIMIT
from schemas.protocol import MAX_SEQ, PollResponse, Presence
from schemas.revocations import MAX_SUBJECT_BYTES
from schemas.tags import TAG_PATTERN

if TYPE_CHECKING:
    from publisher.http_api.app import HttpApiSettings

__all__ = ["openapi_document", "openapi_json"]

#: The version of the document's API (its paths are under ``/v1``).
API_VERSION = "1.0"
_SCHEMAS = "#/components/schemas/"
_EVENTS = "/v1/projects/{project_id}/events"
_PRESENCE = "/v1/projects/{project_id}/presence"
#: What the API answers a request it cannot serve at all, whatever its route (the server,
#: ``publisher.http_api.server``): not HTTP/1.1, headers too large, too many at once.
_ANY_REQUEST = ("invalid_http", "headers_too_large", "overloaded")
#: The meaning of ``overloaded`` for a request whose body is read (--max-body-memory too).
_OVERLOADED_BODY = "overloaded (a body)"
_STATUS = {
    "invalid_json": 400,
    "invalid_body": 400,
    "repeated_key": 400,
    "repeated_header": 400,
    "invalid_header": 400,
    "invalid_idempotency_key": 400,
    "invalid_query": 400,
    "invalid_http": 400,
    "disconnected": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "idempotency_conflict": 409,
    "body_too_large": 413,
    "too_many_events": 413,
    "unsupported_media_type": 415,
    "invalid_event": 422,
    "invalid_revocation": 422,
    "rate_limited": 429,
    "headers_too_large": 431,
    "publish_failed": 502,
    "read_failed": 502,
    "revocation_failed": 502,
    "unavailable": 503,
    "overloaded": 503,
    "revocation_list_full": 507,
}
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


def _meanings(settings: HttpApiSettings) -> dict[str, str]:
    """What each error code means, with the limits of ``settings``."""
    return {
        "invalid_json": "the body is not JSON, or is nested about a thousand levels deep",
        "invalid_body": "an empty array publishes nothing",
        "repeated_key": "a key given twice in one object of the body",
        "repeated_header": "a header given twice (which would count?)",
        "invalid_header": "a header that is not ASCII, or a Content-Length that is not a number",
        "invalid_idempotency_key": "Idempotency-Key is not 1-100 printable ASCII characters "
        "without spaces",
        "invalid_query": "a query parameter unknown, repeated, out of range or malformed "
        "(the message names it)",
        "invalid_http": "the request is not HTTP/1.1; the connection is closed after the answer",
        "disconnected": "the client went away before its body arrived (nobody reads this)",
        "unauthorized": "no key, not a bearer key, or an unknown key",
        "forbidden": "the key may not do this (see the operation)",
        "not_found": "no such path, or a project id out of range",
        "method_not_allowed": "the path does not serve this method (Allow lists those it does)",
        "body_timeout": f"the body did not arrive within {settings.body_timeout:g} s "
        "(serve --body-timeout)",
        "idempotency_conflict": "the Idempotency-Key was used for a different event",
        "body_too_large": "the body exceeds its limit in bytes (see the request body)",
        "too_many_events": f"more than {settings.max_events} events (serve --max-events)",
        "unsupported_media_type": "Content-Type is not application/json",
        "invalid_event": "an event breaks the contract; the message names its index in an "
        "array and the field",
        "invalid_revocation": "the body is not an object of these fields, or a value is out of "
        "range; the message says which",
        "rate_limited": "the key's rate is spent (Retry-After: seconds to wait); an array "
        "larger than the key's burst can never pass (split it; no Retry-After then)",
        "headers_too_large": f"the request line and headers (or a chunked body's chunk lines "
        f"and trailers) exceed {settings.max_header_bytes} bytes (serve --max-header-bytes); the "
        "connection is closed after the answer",
        "publish_failed": "Redis refused the write (a damaged key)",
        "read_failed": "the project's keys hold values the bus did not write, or Redis refused "
        "the read otherwise (READONLY, MISCONF, NOPERM: the message has Redis' words)",
        "revocation_failed": "Redis refused the write (a revocation key of another type)",
        "unavailable": "Redis did not answer in time: retry (a publish with the same "
        "Idempotency-Key)",
        "overloaded": "more connections or requests at once than serve --limit-concurrency; "
        "the connection is closed after the answer",
        # (a request whose body is read: :func:`_responses` with ``body``)
        _OVERLOADED_BODY: "more connections or requests at once than serve --limit-concurrency, "
        f"or more bytes of request bodies than {settings.max_body_memory} (serve "
        "--max-body-memory; one key: a quarter of it); the connection is closed after the answer",
        "revocation_list_full": "a new subject, and the revocation list is full "
        "(serve --max-revocations); retrying does not help until an operator acts",
    }


def _ref(name: str) -> dict:
    return {"$ref": _SCHEMAS + name}


def _components() -> dict[str, Any]:
    """The schemas of every body, from the msgspec types; the event contract twice: as
    published (``EventInput``: ``project_id`` optional, the path names it) and as stored (with
    ``seq``), and the history page's events typed as stored events."""
    types = [
        Event,
        PollResponse,
        Presence,
        RevocationRequest,
        Published,
        PublishedBatch,
        ErrorAnswer,
        RevocationAnswer,
        Health,
        Readiness,
    ]
    (event, *_), schemas = msgspec.json.schema_components(types, ref_template=_SCHEMAS + "{name}")
    schemas = clean_descriptions(schemas)
    schemas["Event"] = {
        "description": "An event of the contract (docs/contract.md), tagged by `type`.",
        **event,
    }
    inputs: dict[str, str] = {}
    for tag, ref in event["discriminator"]["mapping"].items():
        name = ref.removeprefix(_SCHEMAS)
        published = dict(schemas[name])
        published["title"] = name + "Input"
        published["required"] = [field for field in published["required"] if field != "project_id"]
        schemas[name + "Input"] = published
        inputs[tag] = _SCHEMAS + name + "Input"
    schemas["EventInput"] = {
        "description": "An event to publish: an Event whose `project_id` may be left out (the "
        "path names the project; another project's id is refused).",
        "anyOf": [{"$ref": ref} for ref in inputs.values()],
        "discriminator": {"propertyName": "type", "mapping": inputs},
    }
    schemas["StoredEvent"] = {
        "description": "An event as stored and relayed: the Event with its number in the "
        "project's history.",
        "allOf": [
            _ref("Event"),
            {
                "type": "object",
                "properties": {"seq": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}},
                "required": ["seq"],
            },
        ],
    }
    schemas["PollResponse"]["properties"]["events"]["items"] = _ref("StoredEvent")
    # (absent when there are none, never null)
    schemas["ErrorAnswer"]["properties"]["cursors"] = {
        "type": "array",
        "items": {"anyOf": [_ref("EventCursor"), {"type": "null"}]},
    }
    # The publisher checks these ranges (its messages are the 422's), not the struct; the
    # document states them so that a client cannot send what is refused for them. A subject is
    # bounded in UTF-8 bytes, which JSON Schema cannot count: at most as many characters.
    revocation = schemas["RevocationRequest"]["properties"]
    revocation["subject"]["maxLength"] = MAX_SUBJECT_BYTES
    revocation["subject"]["description"] = (
        f"The tokens' `sub`: 1 to {MAX_SUBJECT_BYTES} UTF-8 bytes."
    )
    keep_for = revocation["keep_for"]["anyOf"][0]
    keep_for["maximum"] = int(MAX_KEEP_FOR.total_seconds())
    return dict(sorted(schemas.items()))


def _error(codes: list[str]) -> dict:
    """The body schema of a refusal with one of ``codes``."""
    return {
        "allOf": [_ref("ErrorAnswer")],
        "properties": {"error": {"properties": {"code": {"enum": codes}}}},
    }


def _responses(
    ok: dict,
    codes: tuple[str, ...],
    meanings: dict[str, str],
    *,
    head: bool = False,
    bounded: bool = True,
    body: bool = False,
) -> dict:
    """An operation's responses: ``ok`` (200), and a refusal for each status of ``codes`` (and
    of those any request may get). ``head``: headers only. ``bounded``: refused past
    ``--limit-concurrency`` (``overloaded``), which the probes and /metrics are not
    (``publisher.http_api.server.UNBOUNDED_PATHS``). ``body``: the request's body is read, so
    it may also be refused past --max-body-memory."""
    if body:
        meanings = {**meanings, "overloaded": meanings[_OVERLOADED_BODY]}
    by_status: dict[int, list[str]] = {}
    anyway = _ANY_REQUEST if bounded else tuple(c for c in _ANY_REQUEST if c != "overloaded")
    for code in (*codes, *anyway):
        by_status.setdefault(_STATUS[code], []).append(code)
    responses: dict[str, Any] = {"200": _headless(ok) if head else ok}
    for status in sorted(by_status):
        group = by_status[status]
        lines = "\n".join(f"- `{code}`: {meanings[code]}" for code in group)
        response: dict[str, Any] = {"description": f"{_TITLES[status]}:\n{lines}"}
        if status == 503:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter1"}}
        elif status == 429:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
        if not head:
            response["content"] = {"application/json": {"schema": _error(group)}}
        responses[str(status)] = response
    return responses


def _headless(response: dict) -> dict:
    return {key: value for key, value in response.items() if key != "content"}


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _read(operation_id: str, summary: str, description: str, responses: dict, **extra) -> dict:
    """The GET of a read and its HEAD (headers only)."""
    get = {"operationId": operation_id, "summary": summary, "description": description}
    head = {
        "operationId": operation_id + "Head",
        "summary": summary + " (headers only)",
        "description": "As GET, without the body.",
    }
    return {
        "get": {**get, **extra, "responses": responses["get"]},
        "head": {**head, **extra, "responses": responses["head"]},
    }


def openapi_document(settings: HttpApiSettings | None = None) -> dict:
    """The OpenAPI 3.1 document of the API with ``settings`` (default: the defaults)."""
    if settings is None:
        from publisher.http_api.app import HttpApiSettings

        settings = HttpApiSettings()
    meanings = _meanings(settings)
    revocation_limit = min(settings.max_body, MAX_REVOCATION_BODY)
    key_codes = ("repeated_header", "invalid_header", "unauthorized", "forbidden")
    read_codes = (
        "invalid_query",
        *key_codes,
        "not_found",
        "rate_limited",
        "read_failed",
        "unavailable",
    )
    no_key: list = []

    def reads(ok: dict, codes: tuple[str, ...], *, bounded: bool = True) -> dict:
        return {
            "get": _responses(ok, codes, meanings, bounded=bounded),
            "head": _responses(ok, codes, meanings, head=True, bounded=bounded),
        }

    project = {
        "name": "project_id",
        "in": "path",
        "required": True,
        "description": "The project (a positive integer).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
    }
    history_query = [
        {
            "name": "epoch",
            "in": "query",
            "description": "The cursor's history (with `after`): the `epoch` of the last page "
            "or publish.",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": 64,
                "pattern": "^[A-Za-z0-9_-]+$",
            },
        },
        {
            "name": "after",
            "in": "query",
            "description": "The cursor (with `epoch`): the `seq` of the last event you have. "
            "Without `epoch` and `after` the page has no events, only the cursor to start from.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
        },
        {
            "name": "tag",
            "in": "query",
            "description": "The last page's `tag` (the event at `after`), so that a cursor "
            "naming an event the history no longer holds under that number is told apart.",
            "schema": {"type": "string", "pattern": TAG_PATTERN.replace("(?!\\n)", "")},
        },
        {
            "name": "limit",
            "in": "query",
            "description": "Events per page.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_POLL_LIMIT,
                "default": DEFAULT_POLL_LIMIT,
            },
        },
    ]
    # A blank value (``tag=``) is the parameter's absence (schemas.history.parse_poll_query; the
    # loop in docs/http-publish.md sends one on the first page): without allowEmptyValue the
    # document said ``tag=`` was malformed, and a fuzzer took its 200 for a refusal missed.
    for parameter in history_query:
        parameter["allowEmptyValue"] = True
        parameter["description"] += " A blank value is the parameter's absence."
    events_body = (
        "One event, or an array of 1 to "
        f"{settings.max_events} events (serve --max-events, default 500, at most 500), of "
        f"the path's project; at most {settings.max_body} bytes (serve --max-body, default "
        "4194304). An array without an Idempotency-Key is published atomically (all or none); "
        "with one, event i is published under the key `<key>:<i>`, so a retry publishes "
        "exactly the events still missing."
    )
    paths: dict[str, Any] = {
        _EVENTS: {
            "parameters": [project],
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish one event or an array of events",
                "description": "Validated against the event contract and appended and "
                "published atomically, as `Publisher.publish` does. Nothing is written when the "
                "answer is 4xx or 502, except for an array with an Idempotency-Key: each of "
                "its events is its own write, and a 409 or 502 then carries `cursors`.",
                "tags": ["events"],
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": "A retry with the same key within 10 minutes writes "
                        "nothing and answers the first cursor(s). Keys are per API key.",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 100,
                            "pattern": "^[!-~]+$",
                        },
                    }
                ],
                "requestBody": {
                    "description": events_body,
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    _ref("EventInput"),
                                    {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": settings.max_events,
                                        "items": _ref("EventInput"),
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": _responses(
                    _json(
                        "Published (or an idempotent retry): the cursor of one event, the "
                        "cursors of an array in its order.",
                        {"oneOf": [_ref("Published"), _ref("PublishedBatch")]},
                    ),
                    (
                        "invalid_json",
                        "invalid_body",
                        "repeated_key",
                        "invalid_idempotency_key",
                        "disconnected",
                        *key_codes,
                        "not_found",
                        "body_timeout",
                        "idempotency_conflict",
                        "body_too_large",
                        "too_many_events",
                        "unsupported_media_type",
                        "invalid_event",
                        "rate_limited",
                        "publish_failed",
                        "unavailable",
                    ),
                    meanings,
                    body=True,
                ),
            },
            **_read(
                "readHistory",
                "Read a page of the project's history",
                "The gateway's poll (`Publisher.history`): the stored events after the cursor, "
                f"at most `limit` and at most {settings.history_page_bytes} bytes of them "
                "(serve --history-page-bytes, default 1048576); `more` when further events "
                "wait. When the cursor cannot be honoured, `resync_required` says why. A read "
                "costs one event of the key's rate. The key must allow the project.",
                reads(_json("A page.", _ref("PollResponse")), read_codes),
                tags=["events"],
                parameters=history_query,
            ),
        },
        _PRESENCE: {
            "parameters": [project],
            **_read(
                "readPresence",
                "Who is on the project's dashboards now",
                "The gateway's `presence` message (`Publisher.presence`), members sorted by id; "
                f"at most {settings.presence_max_members} members per gateway pod (serve "
                "--presence-max-members, default 1000). Takes no query parameters. A read costs "
                "one event of the key's rate. The key must allow the project.",
                reads(_json("The members.", _ref("Presence")), read_codes),
                tags=["presence"],
            ),
        },
        REVOCATIONS_PATH: {
            "post": {
                "operationId": "revokeTokens",
                "summary": "Revoke a person's browser tokens",
                "description": "Every gateway refuses the tokens of `subject` issued before "
                "`issued_before` and closes the connections holding one, within about a "
                'second (`Publisher.revoke_tokens`). Only for keys with `"revoke": true`. '
                "A revocation of a subject that has one merges with it.",
                "tags": ["revocations"],
                "requestBody": {
                    "description": f"At most {revocation_limit} bytes (16384, or serve "
                    "--max-body if lower).",
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RevocationRequest")}},
                },
                "responses": _responses(
                    _json(
                        "Revoked: the subject's entry after the merge.", _ref("RevocationAnswer")
                    ),
                    (
                        "invalid_json",
                        "repeated_key",
                        "disconnected",
                        *key_codes,
                        "body_timeout",
                        "body_too_large",
                        "unsupported_media_type",
                        "invalid_revocation",
                        "rate_limited",
                        "revocation_failed",
                        "unavailable",
                        "revocation_list_full",
                    ),
                    meanings,
                    body=True,
                ),
            }
        },
        "/healthz": _read(
            "health",
            "The process is up",
            "Liveness probe; no key.",
            reads(_json("Up.", _ref("Health")), (), bounded=False),
            tags=["probes"],
            security=no_key,
        ),
        "/readyz": _read(
            "readiness",
            "Redis answers",
            f"Readiness probe: 200 when Redis answered PING within {settings.ready_timeout:g} s "
            "(serve --ready-timeout; on Redis Cluster, a majority of its masters did), else 503 "
            "with the reason; no key.",
            _ready_responses(meanings),
            tags=["probes"],
            security=no_key,
        ),
        "/metrics": _read(
            "metrics",
            "Prometheus metrics",
            "Answers by status and code, events published, connections closed without an "
            "answer, foreign stream entries skipped; no key.",
            reads(
                {
                    "description": "Prometheus text exposition.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                (),
                bounded=False,
            ),
            tags=["probes"],
            security=no_key,
        ),
        OPENAPI_PATH: _read(
            "openapi",
            "This document",
            "The OpenAPI document of this API, with the limits it is served with; no key.",
            reads(
                _json("The OpenAPI 3.1 document.", {"type": "object"}),
                (),
            ),
            tags=["probes"],
            security=no_key,
        ),
    }
    for item in paths.values():
        item["x-method-not-allowed"] = {"$ref": "#/components/responses/MethodNotAllowed"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "eventbus HTTP API",
            "version": API_VERSION,
            "description": "Publish events, and read a project's presence and history, from any "
            "language; revoke browser tokens. docs/http-publish.md describes every answer. Limits "
            "shown are the settings this document was made with (`eventbus-publish http-api "
            "serve` flags); GET /openapi.json answers those of the running API.",
        },
        "servers": [
            {"url": "http://127.0.0.1:8766", "description": "serve's default --host and --port"}
        ],
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "events", "description": "Publish events; read a page of history."},
            {"name": "presence", "description": "Who is on a project's dashboards."},
            {"name": "revocations", "description": "Revoke browser tokens."},
            {"name": "probes", "description": "Health, readiness, metrics, this document."},
        ],
        "paths": paths,
        "components": {
            "schemas": _components(),
            "responses": {
                "NotFound": _json(
                    "Not Found: no such path (`not_found`).",
                    _error(["not_found"]),
                ),
                "MethodNotAllowed": {
                    **_json(
                        "Method Not Allowed: the path does not serve this method "
                        "(`method_not_allowed`).",
                        _error(["method_not_allowed"]),
                    ),
                    "headers": {
                        "Allow": {
                            "description": "The methods the path serves.",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    },
                },
            },
            "headers": {
                "RetryAfter": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 1},
                },
                "RetryAfter1": {
                    "description": "Seconds to wait before retrying (1).",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                },
            },
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <api key>`: a key made with "
                    "`eventbus-publish http-api new-key`, allowed the path's project (or, for "
                    "revocations, given `revoke`).",
                }
            },
        },
        "x-not-found": {"$ref": "#/components/responses/NotFound"},
    }


def _ready_responses(meanings: dict[str, str]) -> dict:
    """/readyz: 200 ready, 503 not ready (no Retry-After); answered past --limit-concurrency."""
    ok = _json("Redis answered PING in time.", _ref("Readiness"))
    by_method = {}
    for method, head in (("get", False), ("head", True)):
        responses = _responses(ok, (), meanings, head=head, bounded=False)
        not_ready: dict[str, Any] = {
            "description": "Redis did not answer PING in time (`redis` says what went wrong)",
        }
        if not head:
            not_ready["content"] = {"application/json": {"schema": _ref("Readiness")}}
        responses["503"] = not_ready
        by_method[method] = responses
    return by_method


def openapi_json(settings: HttpApiSettings | None = None) -> bytes:
    """:func:`openapi_document` as the API serves it and ``docs/openapi.json`` holds it."""
    encoded = msgspec.json.encode(openapi_document(settings))
    return msgspec.json.format(encoded, indent=2) + b"\n"
