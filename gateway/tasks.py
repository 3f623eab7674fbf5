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
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task) -> None:
    _running.discard(task)
    if task.cancelled():
        # A cancelled task keeps its CancelledError, whose traceback holds every frame it was
        # cancelled in; a timeout among them (redis-py reads under one) holds the task: a cycle
        # that would keep the frames' objects (a connection's session) until a full collection.
        # Taking the error out of the task (result() hands it over) and its traceback out of it
        # lets reference counting free them now.
        try:
            task.result()
        except asyncio.CancelledError as exc:
            exc.__traceback__ = None
