"""Validation of what a client sends to the demo backend, as pure functions (no sockets).

Every malformed request ends in :class:`BadRequest`, which the server turns into a JSON 4xx
answer; nothing here can raise anything else for any input. The limits are the demo backend's
documented bounds (docs/browser.md, "Demo backend API"):

* a body is at most :data:`MAX_BODY` bytes and must arrive within :data:`BODY_READ_TIMEOUT`
  seconds (the server enforces the time; this module the size and shape);
* ``Content-Length`` is one run of ASCII digits (no sign, no spaces, no second header);
  ``Transfer-Encoding`` is not supported (411: send a length);
* a body is JSON (``Content-Type: application/json`` when the type is given), a single object,
  nested at most :data:`MAX_JSON_DEPTH` levels, with strings that are valid Unicode (no lone
  surrogates, which SQLite and the event encoder would reject later).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from examples.dashboard.store import MAX_ANSWER_LENGTH, MAX_QUESTION_LENGTH

__all__ = [
    "BODY_READ_TIMEOUT",
    "MAX_AGENT_ID_LENGTH",
    "MAX_BODY",
    "MAX_JSON_DEPTH",
    "MAX_TITLE_LENGTH",
    "BadRequest",
    "BlockerRequest",
    "Identity",
    "answer_request",
    "blocker_request",
    "body_length",
    "check_content_type",
    "decode_object",
    "display_name",
    "identity_request",
    "seen_request",
]

MAX_BODY = 64 * 1024
#: Seconds the whole body may take to arrive (the socket's idle timeout bounds each read too).
BODY_READ_TIMEOUT = 10.0
#: Objects/arrays nested deeper than this are refused before ``json.loads`` sees them (the
#: demo's requests are flat; CPython's parser would otherwise hit its recursion limit).
MAX_JSON_DEPTH = 32
MAX_AGENT_ID_LENGTH = 200  # the contract's limits (schemas.events)
MAX_TITLE_LENGTH = 500

_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


class BadRequest(Exception):
    """A client mistake: ``status`` (4xx), a stable ``code`` and a message for the JSON body.

    ``close`` says the connection must be closed after the answer, because the request's body
    was not (or not entirely) read and the stream can no longer be trusted.
    """

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.close = close


def body_length(content_length: list[str], transfer_encoding: list[str]) -> int:
    """The body's length from the request's ``Content-Length`` and ``Transfer-Encoding`` header
    values (every occurrence of each); 0 when there is neither (RFC 9112: no body)."""
    if transfer_encoding:
        raise BadRequest(
            411, "length_required", "Transfer-Encoding is not supported: send Content-Length",
            close=True,
        )  # fmt: skip
    if not content_length:
        return 0
    if len(content_length) > 1:
        raise BadRequest(400, "invalid_content_length", "more than one Content-Length", close=True)
    value = content_length[0].strip()
    if not _DIGITS.fullmatch(value):
        raise BadRequest(
            400, "invalid_content_length", "Content-Length must be a non-negative integer",
            close=True,
        )  # fmt: skip
    length = int(value)
    if length > MAX_BODY:
        raise BadRequest(413, "too_large", f"request body over {MAX_BODY} bytes", close=True)
    return length


def check_content_type(content_type: str | None) -> None:
    """A body must be JSON; a missing type is taken to be JSON (``curl -d`` users forget it)."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadRequest(
            415, "unsupported_media_type", "send the body as Content-Type: application/json"
        )


def _nesting_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _valid_unicode(value: Any) -> bool:
    """No lone surrogates anywhere (``"\\ud800"`` is valid JSON but not encodable text)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def decode_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "invalid_json", "request body is not UTF-8") from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise BadRequest(
            400, "invalid_json", f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "invalid_body", "expected a JSON object")
    if not _valid_unicode(value):
        raise BadRequest(400, "invalid_json", "request body has invalid Unicode (lone surrogate)")
    return value


def _invalid(message: str) -> BadRequest:
    return BadRequest(422, "invalid", message)


def _text(body: dict[str, Any], name: str, limit: int, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise _invalid(f"{name} is longer than {limit} characters")
    return value


@dataclass(frozen=True)
class BlockerRequest:
    """``POST /api/projects/{id}/blockers``: what an agent sends to raise a blocker."""

    agent_id: str
    blocker_type: str
    question: str
    task_title: str | None


def blocker_request(body: dict[str, Any]) -> BlockerRequest:
    """Validate the fields of a raise-blocker body (422 names the first bad field)."""
    agent_id = _text(body, "agent_id", MAX_AGENT_ID_LENGTH, required=True)
    kind = body.get("blocker_type", "ASYNC")
    if not isinstance(kind, str) or kind.upper() not in ("SYNC", "ASYNC"):
        raise _invalid("blocker_type must be SYNC or ASYNC")
    question = _text(body, "question", MAX_QUESTION_LENGTH, required=True)
    task_title = _text(body, "task_title", MAX_TITLE_LENGTH, required=False)
    assert agent_id is not None and question is not None
    return BlockerRequest(agent_id, kind.upper(), question, task_title)


def answer_request(body: dict[str, Any]) -> str:
    """Validate a resolve body ``{"answer": "..."}``; returns the answer."""
    if "answer" not in body:
        raise _invalid('expected {"answer": "..."}')
    answer = _text(body, "answer", MAX_ANSWER_LENGTH, required=True)
    assert answer is not None
    return answer


#: A demo person's id (the token's ``sub``) and display name (its ``name`` claim).
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_DISPLAY_NAME = 40


@dataclass(frozen=True)
class Identity:
    """``POST /api/gateway-token`` body: who the page says its person is (the demo has no login;
    a real application takes both from its session)."""

    user: str | None
    name: str | None


def display_name(value: Any, field: str = "name") -> str:
    """A display name: 1 to 40 printable characters after trimming (422 otherwise)."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{field} must be a non-empty string")
    value = value.strip()
    if len(value) > MAX_DISPLAY_NAME:
        raise _invalid(f"{field} is longer than {MAX_DISPLAY_NAME} characters")
    if not value.isprintable():
        raise _invalid(f"{field} must be printable (no control characters)")
    return value


def identity_request(body: dict[str, Any]) -> Identity:
    """Validate ``{"user": "<id>", "name": "<display name>"}`` (both optional; a name needs a
    user)."""
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not _USER_ID.fullmatch(user)):
        raise _invalid("user must be 1 to 64 of A-Z a-z 0-9 _ -")
    name = body.get("name")
    if name is not None:
        if user is None:
            raise _invalid("name needs a user")
        name = display_name(name)
    return Identity(user, name)


def seen_request(body: dict[str, Any]) -> str | None:
    """Validate ``{"by": "<display name>"}`` (optional) of ``POST /api/blockers/{id}/seen``."""
    by = body.get("by")
    return None if by is None else display_name(by, "by")
