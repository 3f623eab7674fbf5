"""Publish typed project events to the event bus from any Python backend.

Usage (see ``docs/publisher.md``)::

    from publisher import Publisher, issue_token
    from schemas import Blocker

    bus = Publisher.from_url("redis://localhost:6379/0")
    bus.blocker_created(1, Blocker(...))
    bus.blocker_resolved(1, blocker_id=123, answer="Use JWT for stateless API")
    token = issue_token(secret, projects=[1], subject="user-7")  # for the browser
    bus.revoke_tokens("user-7")  # refuse user-7's tokens issued until now, on every gateway
"""

from publisher.client import AsyncPublisher, Publisher
from publisher.core import (
    Cursor,
    IdempotencyConflict,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    PublishManyUnavailable,
    Retention,
    RevocationListFull,
)
from schemas.events import EventValidationError
from schemas.revocations import Revocation
from schemas.tokens import issue_token

__all__ = [
    "AsyncPublisher",
    "Cursor",
    "EventValidationError",
    "IdempotencyConflict",
    "PublishError",
    "PublishManyError",
    "PublishManyUnavailable",
    "Publisher",
    "PublisherUnavailable",
    "Retention",
    "Revocation",
    "RevocationListFull",
    "issue_token",
]
