"""What a client sends, judged before anything acts on it (pure; tested without sockets).

Every way a client frame or an HTTP request can be malformed must end in a documented answer:
an ``error`` message or a close code for frames, a 4xx status for requests. Nothing a client
sends may reach the gateway as an unexpected exception (which websockets turns into a 1011 close
or an HTTP 500 with an error-level traceback: a log line per hostile request).

* :func:`decode_frame` is :func:`schemas.protocol.decode_client_message` that also turns the
  decoder's own limits (JSON nested deeper than msgspec recurses) into a :class:`ProtocolError`.
* :func:`parse_project_id` reads a project id from a request's path, query or ``Last-Event-ID``.
* :func:`repeated_header` finds a header the gateway reads as single-valued but that the request
  repeats (websockets' ``Headers.get`` raises ``MultipleValuesError`` for those).
* :func:`parse_plain_request` reads the common opening handshake request in one step, as
  websockets' parser would; anything less plain is left to websockets' parser.
"""

from __future__ import annotations

import re

from websockets import http11
from websockets.datastructures import Headers
from websockets.http11 import Request

from schemas.protocol import ClientMessage, ErrorCode, ProtocolError, decode_client_message

__all__ = [
    "MAX_CLOSE_REASON_BYTES",
    "SINGLE_VALUED_HEADERS",
    "close_reason",
    "decode_frame",
    "parse_plain_request",
    "parse_project_id",
    "repeated_header",
]

#: A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455: 125-byte payload, 2 of them
#: the code); websockets raises on a longer one.
MAX_CLOSE_REASON_BYTES = 123

#: Headers the gateway reads with ``Headers.get`` (handshake checks, CORS, polling auth). A request
#: that repeats one of them is refused with 400 before any of them is read. (websockets checks the
#: ones it reads itself, ``Sec-WebSocket-Key`` and ``-Version``, and answers 400 on its own.)
SINGLE_VALUED_HEADERS = ("Upgrade", "Origin", "Authorization")

_PROJECT_ID = re.compile(r"[1-9][0-9]{0,15}")  # ASCII only, and short enough for int()


def parse_project_id(raw: str, error: str = "project id must be a positive integer") -> int:
    """``raw`` as a project id (ASCII digits, 1 to 2**53-1, as the protocol's ``ProjectId``),
    else ValueError(``error``)."""
    if not _PROJECT_ID.fullmatch(raw) or int(raw) >= 2**53:
        raise ValueError(error)
    return int(raw)


def decode_frame(data: bytes | str) -> ClientMessage:
    """Parse one client frame; any malformed frame raises :class:`ProtocolError`, nothing else.

    ``invalid_json`` covers JSON nested too deeply for the decoder (msgspec raises
    ``RecursionError`` past its depth limit, a few hundred levels, long before the frame size
    limit): a real client never nests its four message types more than two levels deep.
    """
    try:
        return decode_client_message(data)
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "JSON nested too deeply") from None


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame, at a character boundary. Reasons may quote what the
    client sent (a decoder message), so they are cut by bytes, not characters."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


def repeated_header(headers: Headers, names: tuple[str, ...] = SINGLE_VALUED_HEADERS) -> str | None:
    """The first of ``names`` that ``headers`` holds more than once, else None."""
    for name in names:
        if len(headers.get_all(name)) > 1:
            return name
    return None


# websockets' header name and value characters (``websockets.http11``: a token, then HTAB, SP,
# VCHAR and obs-text); the value's surrounding spaces and tabs are not part of it.
_FIELD_NAME = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VALUE = rb"[\x09\x20-\x7e\x80-\xff]"
_PLAIN_REQUEST = re.compile(
    rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n((?:"
    + _FIELD_NAME
    + rb":"
    + _FIELD_VALUE
    + rb"*\r\n)*)\r\n"
)
# The value is taken whole and stripped afterwards, as websockets does: a lazy value followed by
# optional spaces would backtrack over every run of spaces inside it (quadratic: 32 ms for one
# 8 KiB value holding 8,000 spaces, against websockets' 0.1 ms).
_FIELD = re.compile(rb"(" + _FIELD_NAME + rb"):(" + _FIELD_VALUE + rb"*)\r\n")


def parse_plain_request(data: bytes) -> Request | None:
    """``data`` as websockets' :class:`Request`, when it is exactly one plain request: ``GET``
    of a path of printable ASCII, ``HTTP/1.1``, at most websockets' number of header fields
    (``MAX_NUM_HEADERS``), well-formed (CRLF line ends), no body (no ``Content-Length`` or
    ``Transfer-Encoding``), nothing after the blank line, at most websockets' limit for one line
    (``MAX_LINE_LENGTH``) in all, so that no line can be over it. Both limits are read from
    websockets when called: a deployment may lower them (``WEBSOCKETS_MAX_NUM_HEADERS``,
    ``WEBSOCKETS_MAX_LINE_LENGTH``), and a request over them is refused by websockets (431), not
    read here. The request is the one websockets' parser makes of the same bytes (same path,
    and the same fields in the same order, values stripped of spaces and tabs, decoded as
    ISO-8859-1). None for anything else, which websockets' parser then reads, as every request
    was read before (a browser's handshake, or a client's mistake, answered as websockets
    answers it)."""
    if len(data) > http11.MAX_LINE_LENGTH:
        return None
    match = _PLAIN_REQUEST.fullmatch(data)
    if match is None:
        return None
    fields = _FIELD.findall(match.group(2))
    if len(fields) > http11.MAX_NUM_HEADERS:
        return None
    headers = Headers()
    for name, value in fields:
        headers.set_insecure(name.decode(), value.strip(b" \t").decode("iso-8859-1"))
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        return None  # websockets refuses a body, or reads a zero length: its call
    return Request(match.group(1).decode(), headers)
