"""How the simulated agents learn that their blockers were answered: through the event bus, with
the Python consumer (:class:`consumer.Consumer`), as any Python service waiting on an answer would.

One :class:`AnswerListener` per process follows the demo project through the gateway and hands
every ``blocker_resolved`` to the agents (:meth:`AgentSimulation.answered
<examples.dashboard.workers.AgentSimulation.answered>`). Nobody polls the database for answers.
The database is read only where the bus itself says that events were missed:

* once subscribed (from "now"), the listener asks the agents to *reload*: blockers answered
  before the subscription are read from the database. Reading after the subscription is
  acknowledged leaves no gap: an answer committed later is published later, and so delivered;
* after each ``resync_required`` (Redis flushed, history trimmed): the same reload, exactly what
  the contract asks of every client.

A resume is idempotent (``Store.resume_agent`` resumes a blocker's agent once), so an answer seen
both in a reload and as an event resumes the agent once.

If the gateway is unreachable the consumer reconnects forever (backoff with jitter) and the
agents wait, as a real agent would; once it is back, the consumer resumes from its cursor and
misses nothing, or surfaces a resync that reloads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

from consumer import Consumer, ConsumerError, Delivery, Item, Resync, UndecodableEvent
from consumer.client import TokenSource
from schemas.events import BlockerResolved

__all__ = ["AnswerListener"]

log = logging.getLogger("examples.dashboard")

#: After a fatal consumer error (a refused token, a forbidden project: a misconfiguration), how
#: long before the listener starts a new consumer.
RESTART_DELAY = 5.0


class AnswerListener:
    """A daemon thread with its own asyncio loop running one :class:`consumer.Consumer`.

    Args:
        url: the gateway's WebSocket URL.
        project_id: the project whose answers are followed.
        token: as :class:`consumer.Consumer` takes it (a function minting a fresh token; None for
            a gateway without authentication).
        on_answered: called with the blocker id of every ``blocker_resolved``, in order.
        on_reload: called once the subscription is acknowledged and after every resync: read
            what was missed from the database.
    """

    def __init__(
        self,
        url: str,
        project_id: int,
        *,
        token: TokenSource | None,
        on_answered: Callable[[int], None],
        on_reload: Callable[[], None],
    ) -> None:
        self.url = url
        self.project_id = project_id
        self.token = token
        self.on_answered = on_answered
        self.on_reload = on_reload
        #: Set once the first subscription was acknowledged and the first reload done.
        self.ready = threading.Event()
        self.consumer: Consumer | None = None
        self._thread = threading.Thread(target=self._run, name="answer-listener", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()

    def start(self) -> AnswerListener:
        self._thread.start()
        self._started.wait(5)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            # The loop may be closing on its own meanwhile: then there is nothing to cancel.
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._started.set()
        try:
            while True:
                try:
                    await self._follow()
                except ConsumerError as exc:
                    log.error(
                        "answer listener stopped (%s); restarting in %.0f s", exc, RESTART_DELAY
                    )
                except Exception:
                    log.exception("answer listener failed; restarting in %.0f s", RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)
        except asyncio.CancelledError:
            pass

    async def _follow(self) -> None:
        async with Consumer(self.url, token=self.token) as consumer:
            self.consumer = consumer
            async with consumer.events(self.project_id) as subscription:
                await subscription.wait_subscribed()
                await asyncio.to_thread(self.on_reload)
                self.ready.set()
                await self.route(subscription)

    async def route(self, items: AsyncIterator[Item]) -> None:
        """Hand each item to the agents until the iterator ends.

        An event this version cannot decode (a type added by a newer publisher, or garbage in
        Redis) is skipped with a warning and the iteration goes on: it is no answer these agents
        could act on, and restarting the consumer for it would only repeat the warning.
        """
        while True:
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            except UndecodableEvent as exc:
                log.warning("answers: skipping event %s:%s (%s)", exc.epoch, exc.seq, exc)
                continue
            if isinstance(item, Delivery):
                if isinstance(item.event, BlockerResolved):
                    self.on_answered(item.event.blocker_id)
            elif isinstance(item, Resync):
                log.info("answers resync (%s): reloading from the database", item.reason)
                await asyncio.to_thread(self.on_reload)
