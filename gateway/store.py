"""Reads of project history (the Redis streams) for subscribes, gap repair and polling."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio
import redis.exceptions

from gateway.sequencing import Snapshot
from publisher.core import new_epoch
from schemas import lua
from schemas.keys import Keys, stream_entry_seq

__all__ = ["HistoryStore", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """Redis did not answer a history read."""


class HistoryStore:
    """Atomic snapshots of projects' cursors and history, through the ``SNAPSHOT`` script."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._snapshot = client.register_script(lua.SNAPSHOT)

    async def snapshot(
        self, project_id: int, epoch: str | None = None, after: int | None = None, limit: int = 0
    ) -> Snapshot:
        """The project's ``(epoch, top)`` and, when ``epoch`` is current and ``after`` is behind,
        up to ``limit`` entries after ``after``. Creates the history if it does not exist."""
        try:
            raw_epoch, top, created, raw_entries = await self._snapshot(
                keys=[self.keys.meta(project_id), self.keys.stream(project_id)],
                args=[new_epoch(), epoch or "", -1 if after is None else after, limit],
            )
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        entries = [(stream_entry_seq(entry_id), _frame(fields)) for entry_id, fields in raw_entries]
        return Snapshot(raw_epoch.decode(), int(top), entries, bool(created))

    async def cursors(self, project_ids: Sequence[int]) -> list[tuple[str | None, int | None]]:
        """``(epoch, top)`` of each project, ``(None, None)`` where its history is missing."""
        if not project_ids:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for project_id in project_ids:
                    pipe.hmget(self.keys.meta(project_id), "epoch", "seq")
                rows = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [
            (epoch.decode(), int(seq)) if epoch is not None and seq is not None else (None, None)
            for epoch, seq in rows
        ]

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False


def _frame(fields: list[bytes] | dict) -> bytes:
    # XRANGE inside a script returns a flat [field, value, ...] list.
    if isinstance(fields, dict):
        return fields[b"f"]
    return fields[fields.index(b"f") + 1]
