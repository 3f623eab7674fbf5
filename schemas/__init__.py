"""The shared contract of the event bus: event types, the browser wire protocol, and the Redis
storage layout (key names, channel message format, Lua scripts).

Everything that two processes must agree on lives here and nowhere else.
"""

from schemas.events import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    Event,
    EventValidationError,
    ProjectEvent,
    decode_event,
    encode_event,
    event_types,
    repeated_key,
    utc_now,
)
from schemas.keys import DEFAULT_PREFIX, Envelope, Keys, parse_envelope

__all__ = [
    "DEFAULT_PREFIX",
    "AgentResumed",
    "Blocker",
    "BlockerCreated",
    "BlockerExpired",
    "BlockerResolved",
    "Envelope",
    "Event",
    "EventValidationError",
    "Keys",
    "ProjectEvent",
    "decode_event",
    "encode_event",
    "event_types",
    "parse_envelope",
    "repeated_key",
    "utc_now",
]
