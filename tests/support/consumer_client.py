"""The Python consumer (:class:`consumer.Consumer`) behind :class:`ResumingClient`'s interface, so
that the random walk of faults (tests/test_interleavings.py) judges it end to end like the
WebSocket and SSE test clients: every event in order, exactly once, or an explicit Resync.

:class:`ConsumerClient` runs a real ``Consumer`` (every gateway URL, round robin; a
:class:`~consumer.FileCursorStore`; catch-up by pages on) and one subscription of its projects,
and records what the caller of ``consumer.events()`` gets into the same ``.log[project]`` of
:class:`Received` records:

* each :class:`~consumer.Delivery`: ``Received("event", epoch, seq, ident=blocker_id,
  tag=event_tag(raw))`` (the tag of the frame as received, as the other clients record it);
* each :class:`~consumer.Resync`: ``Received("resync", epoch, seq, reason, tag)``.

The consumer does not surface ``subscribed``: only its cursors. The verdict needs a starting
point, so the first instance of a client, once the gateway acknowledged every project
(``Subscription.wait_subscribed``), records a synthetic ``Received("subscribed", epoch, seq,
resumed=False, tag)`` from ``Consumer.cursor(project)``, and saves that cursor to the store (a
consumer that leaves before its first event then resumes from there, not from "now"). That is
exact only when nothing reaches the consumer between the acknowledgement and the read of its
cursor: the walk starts its clients before it publishes anything (``Walk.start`` waits for
:attr:`live`). A later instance (the walk's ``return``) records nothing of the kind: it resumes
from the store, and its record continues the old one's, as a reconnect would.

Each item is recorded, then its cursor saved (``auto_commit=False``, :meth:`Subscription.commit`):
:meth:`stop` closes the consumer (its iterators end; items still buffered are neither recorded
nor saved) and waits for the readers, so the store always holds the cursor of the last recorded
item, tag included, and the returning instance (or a project followed again after a pause)
resumes exactly there (a save cancelled halfway would otherwise show up as a duplicate the
consumer is not to blame for).

:meth:`abort` cuts the consumer's current WebSocket without a close handshake, :meth:`drop`
closes it cleanly; the consumer reconnects and resumes by itself.

:meth:`pause` and :meth:`unpause` stop and resume following one project the way a service does
with the public API (docs/consumer.md, "bus.events"): the subscription that holds the project is
closed (``Subscription.aclose()``: the gateway is told ``unsubscribe``; every item recorded was
saved first), the other projects it held are followed again at once in a new subscription on the
same connection, and :meth:`unpause` follows the project again with ``events(project)``, which
resumes from the cursor store. That is the consumer's counterpart of the WebSocket test client's
unsubscribe and resubscribe, and it exercises what the consumer promises of a project followed
again on the same connection: what the gateway sent for the old subscription before it read the
unsubscribe never reaches the new one. (A reader that stops reading is the other way a
subscription stops: that stops the whole connection once a buffer is full, every project, and
within the walk's volumes never reaches the gateway's outbound limit; tests/test_consumer*.py
cover flow control.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from consumer import (
    Consumer,
    ConsumerError,
    Delivery,
    FileCursorStore,
    ReconnectPolicy,
    Resync,
    Subscription,
)
from schemas.tags import event_tag
from tests.support.ws_client import Cursor, Received, Stats, reached, wait_for

__all__ = ["ConsumerClient"]

#: Quick reconnects, about as the other walk clients (0.02 to 0.25 s): the walk's settle steps
#: give 30 s to catch up, which a 30 s backoff cap could exceed after a long outage.
POLICY = ReconnectPolicy(initial=0.05, max=0.5, stable_after=2.0)


class ConsumerClient:
    """A :class:`consumer.Consumer` recorded as a :class:`ResumingClient` (see the module doc).

    Args:
        urls: the gateways' WebSocket URLs (the consumer goes round robin from ``urls[start]``).
        projects: the projects of its one subscription.
        store_path: its :class:`~consumer.FileCursorStore` (a returning client gets the same
            path: a restarted process); default, a file in a new temporary directory.
        cursors, tags: what the walk hands a returning client; the consumer resumes from its
            store instead, which must agree (checked: a disagreement is ``unexpected``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        projects: Iterable[int],
        *,
        token: str | None = None,
        start: int = 0,
        name: str = "",
        cursors: Mapping[int, Cursor] | None = None,
        tags: Mapping[int, str | None] | None = None,
        store_path: str | Path | None = None,
    ) -> None:
        self.urls = list(urls[start % len(urls) :]) + list(urls[: start % len(urls)])
        self.projects = list(projects)
        self.token = token
        self.name = name
        if store_path is None:
            store_path = Path(tempfile.mkdtemp(prefix="consumer-client-")) / "cursors.json"
        self.store_path = Path(store_path)
        self.cursors: dict[int, Cursor] = dict(cursors or {})
        self._tags: dict[int, str | None] = dict(tags or {})
        self._expected = (dict(self.cursors), dict(self._tags)) if cursors else None
        self.log: dict[int, list[Received]] = {p: [] for p in self.projects}
        self.stats = Stats()
        self.live: set[int] = set()
        self.paused: set[int] = set()
        self.pauses = 0  # pause() calls that closed a subscription (the walk's summary)
        self.consumer: Consumer | None = None
        self._store: FileCursorStore | None = None
        self._task: asyncio.Task | None = None
        #: The subscription following each project, and the reader of each subscription.
        self._subscription_of: dict[int, Subscription] = {}
        self._readers: dict[Subscription, asyncio.Task] = {}
        self._changed = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ConsumerClient:
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")
        return self

    async def stop(self) -> None:
        """Close the consumer (a process stopping) and wait for the reader to finish recording
        and saving what it was handed."""
        consumer = self.consumer
        if consumer is not None:
            await consumer.aclose()
        elif self._task is not None:  # not running yet (a leave right after a return)
            self._task.cancel()
        if self._task is not None:
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(self._task)
            except asyncio.CancelledError:
                if not self._task.cancelled():
                    raise
            except TimeoutError:
                self.stats.unexpected.append({"stop": "the reader did not end within 10 s"})
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self.live.clear()
        self._count_connects()

    async def drop(self) -> None:
        """Close the consumer's current connection cleanly (it reconnects and resumes)."""
        ws = self.consumer._ws if self.consumer is not None else None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    def abort(self) -> None:
        """Cut the consumer's current connection, no close handshake (a lost network)."""
        ws = self.consumer._ws if self.consumer is not None else None
        if ws is not None:
            ws.transport.abort()

    async def pause(self, project_id: int) -> None:
        """Stop following a project: close the subscription that holds it (an ``unsubscribe``
        on the gateway) once its reader has recorded and saved what it took, and follow that
        subscription's other projects again at once, from the store. Items still buffered for
        the closed subscription are neither recorded nor saved: the resume asks for them again."""
        self.paused.add(project_id)
        self.live.discard(project_id)
        subscription = self._subscription_of.get(project_id)
        if subscription is None:  # not following yet (the reader starts without it)
            return
        self.pauses += 1
        await subscription.aclose()
        reader = self._readers.get(subscription)
        if reader is not None:
            # It ends at its next item: after the record and save in hand, never halfway.
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(reader)
            except TimeoutError:
                self.stats.unexpected.append({"pause": "the reader did not end within 10 s"})
                reader.cancel()
        others = [
            p
            for p in subscription.project_ids
            if p not in self.paused and self._subscription_of.get(p) is subscription
        ]
        for p in subscription.project_ids:
            if self._subscription_of.get(p) is subscription:
                del self._subscription_of[p]
        if others:
            self._follow(others)

    async def unpause(self, project_id: int, within: float = 10.0) -> None:
        """Follow a paused project again (``events(project)``), from the store: the cursor of
        the last item recorded. Nothing to wait for: the consumer itself drops what the gateway
        still sends for the old subscription until it answers the unsubscribe."""
        self.paused.discard(project_id)
        consumer = self.consumer
        if consumer is None or consumer._closed or project_id in self._subscription_of:
            return  # not started yet (it follows every project not paused), or stopped
        self._follow([project_id])

    def cursor_tag(self, project_id: int) -> str | None:
        return self._tags.get(project_id)

    def cursor_tags(self) -> dict[int, str | None]:
        return {p: self.cursor_tag(p) for p in self.cursors}

    def _count_connects(self) -> None:
        if self.consumer is not None:
            self.stats.connects = self.consumer.connects

    # --- the reader ----------------------------------------------------------------------------

    async def _run(self) -> None:
        store = FileCursorStore(self.store_path)
        if self._expected is not None:  # a returning client: the store is where it resumes
            for project_id, cursor in self._expected[0].items():
                saved = await store.load(project_id)
                tag = self._expected[1].get(project_id)
                if saved is None or (saved.epoch, saved.seq, saved.tag) != (*cursor, tag):
                    self.stats.unexpected.append(
                        {"store": project_id, "saved": saved, "expected": (cursor, tag)}
                    )
        consumer = Consumer(
            self.urls, token=self.token, store=store, auto_commit=False, reconnect=POLICY
        )
        try:
            async with consumer:
                # No suspension from here to the first follow: pause and unpause see either no
                # consumer (and this follows every project not paused) or the subscriptions.
                self._store = store
                self.consumer = consumer
                self._follow([p for p in self.projects if p not in self.paused])
                await consumer._stopped.wait()  # closed (stop) or failed
        finally:
            readers = list(self._readers.values())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*(asyncio.shield(r) for r in readers))
            for reader in readers:
                reader.cancel()
            self.live.clear()
            self._count_connects()
            self._changed.set()

    def _follow(self, projects: list[int]) -> None:
        """Follow ``projects`` in one new subscription (each from the store), with its reader."""
        consumer = self.consumer
        assert consumer is not None
        if consumer._closed:  # stopped (or failed) meanwhile: nothing to follow any more
            return
        subscription = consumer.events(*projects)
        for project_id in projects:
            self._subscription_of[project_id] = subscription
        self._readers[subscription] = asyncio.create_task(
            self._read(subscription), name=f"consumer-{self.name}-{'-'.join(map(str, projects))}"
        )

    async def _read(self, subscription: Subscription) -> None:
        consumer = self.consumer
        assert consumer is not None and self._store is not None
        try:
            first = [p for p in subscription.project_ids if not self.log[p]]
            if first:  # the first instance: the starting point
                await subscription.wait_subscribed()
                for project_id in first:
                    cursor = consumer.cursor(project_id)
                    assert cursor is not None
                    self._set_cursor(project_id, cursor.epoch, cursor.seq, cursor.tag)
                    self.log[project_id].append(
                        Received(
                            "subscribed", cursor.epoch, cursor.seq, resumed=False, tag=cursor.tag
                        )
                    )
                    await self._store.save(project_id, cursor)
            self.live |= {p for p in subscription.project_ids if p not in self.paused}
            self._changed.set()
            while True:
                try:
                    item = await anext(subscription)
                except StopAsyncIteration:
                    return
                except ConsumerError as exc:  # a refusal, an undecodable event: never expected
                    self.stats.unexpected.append({"item": repr(exc)})
                    if consumer._failure is not None:
                        return
                    continue
                self._record(item)
                await subscription.commit()
        except ConsumerError as exc:
            if not consumer._closed or consumer._failure is not None:
                self.stats.unexpected.append({"consumer": repr(exc)})
        finally:
            self._readers.pop(subscription, None)

    def _record(self, item: Delivery | Resync) -> None:
        log = self.log[item.project_id]
        if type(item) is Delivery:
            ident = json.loads(item.raw).get("blocker_id")
            tag = event_tag(item.raw)
            log.append(Received("event", item.epoch, item.seq, ident=ident, tag=tag))
            self.stats.events += 1
            self._set_cursor(item.project_id, item.epoch, item.seq, tag)
        else:
            reason = getattr(item.reason, "value", item.reason)
            log.append(Received("resync", item.epoch, item.seq, reason=reason, tag=item.tag))
            self.stats.resyncs += 1
            self._set_cursor(item.project_id, item.epoch, item.seq, item.tag)
        self._count_connects()
        self._changed.set()

    def _set_cursor(self, project_id: int, epoch: str, seq: int, tag: str | None) -> None:
        self.cursors[project_id] = (epoch, seq)
        self._tags[project_id] = tag

    # --- waiting -------------------------------------------------------------------------------

    reached = reached
    wait_for = wait_for
