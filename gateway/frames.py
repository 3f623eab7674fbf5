"""WebSocket frames built once and written as-is to every subscriber.

A server-to-client frame is not masked, so the bytes of a text frame depend only on the payload:
the gateway builds each event's frame once per pod and writes the same ``bytes`` object to every
subscriber's transport, where websockets would build (and copy) a frame per connection.
"""

from __future__ import annotations

import struct

__all__ = ["text_frame"]

_FIN_TEXT = 0x81
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """An unfragmented, unmasked, uncompressed text frame carrying ``payload`` (UTF-8 JSON)."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, length) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, length) + payload
