"""A Redis failover that lost events, as it looks from the outside: the promoted replica never got
the project's last events, so its stream ends before them and its seq is behind; the next
publish numbers its event as the first lost one was (docs/protocol.md, "Cursor tags")."""

from __future__ import annotations

import redis

from schemas.keys import Keys

KEYS = Keys()


def failover(redis_url: str, project_id: int, keep: int) -> None:
    """The project's history as a replica that had only events 1..``keep`` holds it."""
    client = redis.Redis.from_url(redis_url)
    try:
        stream = KEYS.stream(project_id)
        kept = client.xrange(stream, "-", f"{keep}-0")
        with client.pipeline(transaction=True) as pipe:
            # Rebuilt, not XDEL'd: a stream remembers its last id, a replica never saw it.
            pipe.delete(stream)
            for entry_id, fields in kept:
                pipe.xadd(stream, fields, id=entry_id)
            pipe.hset(KEYS.meta(project_id), "seq", keep)
            pipe.execute()
    finally:
        client.close()
