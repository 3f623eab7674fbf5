"""The bytes of request bodies the HTTP API holds at once (``--max-body-memory``).

A request's body is read whole before it is parsed (at most ``--max-body``, 4 MiB), and its
events are held until Redis has answered (up to 10 s when Redis hangs). ``--limit-concurrency``
bounds how many requests are in progress, not how large they are: 1,000 connections each sending
a 4 MiB body, slowly or behind a hung Redis, made the process hold 4-8 GB. :class:`BodyMemory`
bounds what they hold together, and what one key holds (a quarter of it: one service gone wrong
cannot alone refuse the others); a body that would pass either bound is refused at once, 503
``overloaded`` with ``Retry-After``, rather than queued (its client retries; its memory is
never taken).

A body counts from its headers for the length it declares (``Content-Length``, so a client
trickling a large body holds its place from the start, as it will hold the memory), a chunked
body as its chunks arrive; it stops counting when its request has been answered. Pure: no I/O,
no clock.
"""

from __future__ import annotations

__all__ = ["KEY_SHARE", "BodyHold", "BodyMemory"]

#: One key holds at most this fraction (1 / KEY_SHARE) of ``--max-body-memory``; the setting is
#: therefore at least ``KEY_SHARE`` times ``--max-body``, so that every key can send one body.
KEY_SHARE = 4


class BodyMemory:
    """Bytes of request bodies held, in all and per key, against ``limit`` and
    ``limit // KEY_SHARE``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.key_limit = limit // KEY_SHARE
        #: Bytes held by every request in progress together.
        self.held = 0
        self._by_key: dict[str, int] = {}

    def take(self, key_id: str, size: int) -> bool:
        """Hold ``size`` more bytes for a body of ``key_id``; False, holding nothing more, when
        that would pass the limit or the key's share of it."""
        mine = self._by_key.get(key_id, 0) + size
        if self.held + size > self.limit or mine > self.key_limit:
            return False
        self.held += size
        self._by_key[key_id] = mine
        return True

    def give_back(self, key_id: str, size: int) -> None:
        """Release ``size`` bytes taken for ``key_id`` (at most what it holds)."""
        if size <= 0:
            return
        mine = self._by_key[key_id] - size
        self.held -= size
        if mine > 0:
            self._by_key[key_id] = mine
        else:
            del self._by_key[key_id]

    def held_by(self, key_id: str) -> int:
        """Bytes the bodies of ``key_id`` hold now."""
        return self._by_key.get(key_id, 0)

    def hold(self, key_id: str) -> BodyHold:
        """What one request of ``key_id`` will hold: nothing yet."""
        return BodyHold(self, key_id)


class BodyHold:
    """The bytes one request's body holds: grown as the body is read, released once when the
    request is answered (:meth:`release` again does nothing)."""

    def __init__(self, memory: BodyMemory, key_id: str) -> None:
        self._memory = memory
        self._key_id = key_id
        #: Bytes held for this request.
        self.size = 0

    def cover(self, size: int) -> bool:
        """Hold at least ``size`` bytes in all for this body (a declared length, or what has
        arrived); False, holding what it held, when the rest cannot be taken."""
        more = size - self.size
        if more <= 0:
            return True
        if not self._memory.take(self._key_id, more):
            return False
        self.size = size
        return True

    def release(self) -> None:
        """Give back everything held (the request is answered)."""
        self._memory.give_back(self._key_id, self.size)
        self.size = 0
