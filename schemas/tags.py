"""Event tags: the identity of the event a cursor names (docs/protocol.md, "Cursor tags").

A cursor ``(epoch, seq)`` names an event by its number. Redis replication is asynchronous, so a
failover can lose the last events an old master published (and clients received), and the new
master then hands their numbers to new events: the same cursor now names another event. A tag
travels with the cursor so that the gateway can tell (the idea of Kafka's leader epochs, KIP-101
and KIP-320, with the event's own bytes standing in for a leader epoch Redis does not have).

The tag is computed from the event's JSON text exactly as delivered (the stored frame, which the
gateway relays without re-encoding), so a client computes it from what it received, and event
frames carry nothing new. Redis computes the same value with ``redis.sha1hex`` (schemas.lua).
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["TAG_LENGTH", "TAG_PATTERN", "event_tag", "is_tag", "stored_tag", "tags_differ"]

#: Hex digits of SHA-1 kept: 64 bits, so that two different events at one number collide with a
#: chance of one in 2**64.
TAG_LENGTH = 16
#: A tag's syntax (also the JSON Schema's; ``(?!\n)`` as for the epoch in schemas.protocol).
TAG_PATTERN = r"^[0-9a-f]{16}(?!\n)$"
_TAG_RE = re.compile(r"[0-9a-f]{16}")


def event_tag(frame: bytes) -> str:
    """The tag of an event: the first 16 hex digits of SHA-1 over its UTF-8 JSON text."""
    return hashlib.sha1(frame, usedforsecurity=False).hexdigest()[:TAG_LENGTH]


def stored_tag(payload: bytes, seq: int) -> str:
    """The tag of the frame the publish script stores for an encoded event ``payload`` (a JSON
    object, as ``encode_event`` makes it) numbered ``seq``: the payload with ``,"seq":<seq>``
    spliced in before its closing brace (schemas.lua.PUBLISH)."""
    return event_tag(payload[:-1] + b',"seq":%d}' % seq)


def is_tag(value: object) -> bool:
    """Whether ``value`` is a well-formed tag (16 lowercase hex digits)."""
    return isinstance(value, str) and _TAG_RE.fullmatch(value) is not None


def tags_differ(own: str | None, named: str | None) -> bool:
    """Whether two tags for one cursor name different events: both known, and not equal (an
    unknown tag, None, is no evidence either way)."""
    return own is not None and named is not None and own != named
