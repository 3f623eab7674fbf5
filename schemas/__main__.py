"""``python -m schemas``: print the JSON Schema of every event and protocol message.

The output is committed as ``schemas/eventbus.schema.json``; ``tests/test_schemas.py`` fails when
that file is stale. Regenerate it with ``python -m schemas > schemas/eventbus.schema.json``.
"""

from __future__ import annotations

import sys

import msgspec

from schemas.events import Event
from schemas.export import clean_descriptions
from schemas.protocol import ClientMessage, PollResponse, ServerMessage


def json_schema() -> dict:
    """One document: ``$defs`` for every type, and the four top-level unions as properties."""
    (event, client, server, poll), components = msgspec.json.schema_components(
        [Event, ClientMessage, ServerMessage, PollResponse], ref_template="#/$defs/{name}"
    )
    components = clean_descriptions(components)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eventbus",
        "description": "Events (as published), and the browser <-> gateway wire protocol. "
        "Events relayed by the gateway also carry an integer `seq`.",
        "$defs": components,
        "properties": {
            "event": event,
            "client_message": client,
            "server_message": server,
            "poll_response": poll,
        },
    }


def main() -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(json_schema()), indent=2).decode())
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
