"""Fire-and-forget tasks that are still referenced until they finish.

The event loop keeps only weak references to tasks: a task nobody holds may be garbage collected
before it completes (an UNSUBSCRIBE never sent, a close frame never written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["spawn"]

_running: set[asyncio.Task] = set()


def spawn(coroutine: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task:
    """Start ``coroutine`` in the background and keep it alive until it finishes."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
