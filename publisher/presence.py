"""Read a project's presence from a backend: who is connected, viewing and answering what.

The read is one atomic script call (:data:`schemas.presence.READ`) over every live gateway pod's
records, merged exactly as the gateway merges them, so a backend sees what the dashboards see
(at most one write interval, 0.1 s, behind). These functions are what
``Publisher.presence(project_id)``, ``AsyncPublisher.presence(project_id)`` and
``eventbus-publish presence <project>`` call; they take a redis-py client (sync or asyncio,
standalone or Cluster) and the deployment's :class:`~schemas.keys.Keys`::

    members = read_presence(redis.Redis(), 1)
    answering = [(m.name, m.answering) for m in members if m.answering is not None]
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from redis.client import NEVER_DECODE

from publisher.core import check_positive
from schemas.keys import Keys
from schemas.presence import (
    DEFAULT_MAX_MEMBERS,
    READ,
    MalformedReadReply,
    merge_pods,
    parse_read_reply,
    read_args,
)
from schemas.protocol import Member

__all__ = ["aread_presence", "read_presence"]


def _args(keys: Keys, project_id: int, max_members: int) -> tuple[list[str], list[str | int]]:
    check_positive(project_id, "project_id")
    check_positive(max_members, "max_members")
    return (
        [keys.presence_pods(project_id), keys.presence_versions(project_id)],
        read_args(keys.presence_pod_prefix(project_id), max_members),
    )


def _command(key_names: list[str], args: list[str | int]) -> tuple[tuple, dict]:
    """The read's command, its reply left as bytes whatever the client's ``decode_responses``:
    a client that decodes replies raised ``UnicodeDecodeError`` for the whole read when
    another writer left bytes that are not UTF-8 in a record (the parse skips such a record)."""
    return ("EVAL", READ, len(key_names), *key_names, *args), {NEVER_DECODE: True}


def _members(reply: list) -> list[Member]:
    try:
        parsed = parse_read_reply(reply)
    except MalformedReadReply as exc:  # not Redis, or a broken one: an error of the Redis call
        raise redis.exceptions.InvalidResponse(str(exc)) from None
    pods = {pod: state.records for pod, state in parsed.items()}
    members = merge_pods(pods)
    return [members[k] for k in sorted(members)]


def read_presence(
    client: Any,
    project_id: int,
    *,
    keys: Keys | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[Member]:
    """The members of a project, sorted by id (empty when nobody is connected).

    ``max_members`` is the gateways' ``--presence-max-members``: a pod listing more than
    :func:`~schemas.presence.read_limit` of it is taken for another writer's and left out whole
    (so are members past that many), so a deployment that raised the setting passes it here.
    A reply the read script cannot have given raises ``redis.exceptions.InvalidResponse``."""
    command, options = _command(*_args(keys or Keys(), project_id, max_members))
    return _members(client.execute_command(*command, **options))


async def aread_presence(
    client: Any,
    project_id: int,
    *,
    keys: Keys | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[Member]:
    """:func:`read_presence` for a ``redis.asyncio`` client."""
    command, options = _command(*_args(keys or Keys(), project_id, max_members))
    return _members(await client.execute_command(*command, **options))
