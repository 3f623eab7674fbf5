"""The HTTP publish API: publish events from any language with one POST.

``python -m publisher.http_api serve`` (docs/http-publish.md) runs an ASGI application on uvicorn
that turns ``POST /v1/projects/{id}/events`` into :meth:`publisher.AsyncPublisher.publish`, so a
Node, Go or Ruby service gets the same validation, atomic append-and-publish and idempotency as a
Python one, and reads a project's presence and history as a Python one can. Credentials are API
keys (hashes in a keys file), distinct from browser tokens.
"""

from publisher.http_api.app import HttpApiSettings, PublishApi
from publisher.http_api.core import ApiError, ApiKey, Credentials, hash_key, new_key

__all__ = [
    "ApiError",
    "ApiKey",
    "Credentials",
    "HttpApiSettings",
    "PublishApi",
    "hash_key",
    "new_key",
]
