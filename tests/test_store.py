"""HistoryStore's batching of snapshot reads, without Redis."""

from __future__ import annotations

import asyncio

from gateway.store import SNAPSHOT_PIPELINES, HistoryStore
from schemas.keys import Keys


class ReleasedTogether:
    """A client whose pipelines all answer in the same event-loop iteration."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def register_script(self, script):
        return None

    def pipeline(self, transaction=False):
        client = self

        class Pipe:
            count = 0

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc_info):
                return False

            def execute_command(self, *args):
                self.count += 1

            async def execute(self, raise_on_error=True):
                await client.release.wait()
                return [[b"E", 5, 0, []]] * self.count

        return Pipe()


async def test_a_follow_up_read_made_as_every_sender_finishes_is_still_sent():
    """Like Hub._read_history: read, then at once read again. When every sender finished in the
    same iteration, the follow-up must still find a sender (or start one)."""
    client = ReleasedTogether()
    store = HistoryStore(client, Keys())
    outcome = {}

    async def reader(project_id: int) -> None:
        await store.snapshot(project_id, "E", 0, 10)
        if project_id == 1:
            async with asyncio.timeout(2):
                outcome["follow_up"] = await store.snapshot(project_id, "E", 5, 10)

    tasks = []
    for project_id in range(1, SNAPSHOT_PIPELINES + 1):  # one sender each
        tasks.append(asyncio.create_task(reader(project_id)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    client.release.set()
    await asyncio.gather(*tasks)
    assert outcome["follow_up"].top == 5
    assert not store._senders and not store._queue
