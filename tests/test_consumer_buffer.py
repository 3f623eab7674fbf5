"""The consumer's subscription buffer (``consumer.buffer.BoundedQueue``) on its own, without
sockets: bounded by items and by bytes, one oversized item admitted alone, waiting puts admitted
in order, cancellation leaving nothing behind."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.buffer import BoundedQueue


def queue(maxitems: int = 100, maxbytes: int = 10) -> BoundedQueue:
    return BoundedQueue(maxitems, maxbytes, len)  # items are bytes: their length is their size


async def test_items_are_held_up_to_the_byte_bound_and_then_a_put_waits():
    q = queue(maxbytes=10)
    for item in (b"aaaa", b"bbbb"):
        q.put_nowait(item)
    assert (q.qsize(), q.nbytes) == (2, 8)
    assert q.fits(b"cc") and not q.fits(b"ccc") and not q.full()
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"ccc")
    put = asyncio.create_task(q.put(b"ccc"))
    await asyncio.sleep(0)
    assert not put.done() and q.full()  # a put waits: nothing else is admitted ahead of it
    assert not q.fits(b"c")
    assert await q.get() == b"aaaa"
    await put  # room made: admitted
    assert (q.qsize(), q.nbytes) == (2, 7)
    assert [q.get_nowait(), q.get_nowait()] == [b"bbbb", b"ccc"]
    assert q.empty() and q.nbytes == 0


async def test_items_are_held_up_to_the_count_bound_whatever_their_size():
    q = queue(maxitems=2, maxbytes=1000)
    q.put_nowait(b"a")
    q.put_nowait(b"b")
    assert q.full() and not q.fits(b"c")
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"c")


async def test_one_item_larger_than_the_byte_bound_is_admitted_alone_never_a_deadlock():
    q = queue(maxbytes=10)
    q.put_nowait(b"x" * 50)  # empty: admitted
    assert (q.qsize(), q.nbytes) == (1, 50) and q.full()
    put = asyncio.create_task(q.put(b"y" * 50))
    await asyncio.sleep(0)
    assert not put.done()
    assert q.get_nowait() == b"x" * 50
    await put  # the queue emptied: the next big one in
    assert q.qsize() == 1 and q.get_nowait() == b"y" * 50


async def test_a_waiting_large_item_is_not_overtaken_by_small_ones():
    """FIFO among waiting puts: items of one project put from two tasks keep their order, and a
    large item waiting for room is not starved by a stream of small ones."""
    q = queue(maxbytes=10)
    q.put_nowait(b"a" * 6)
    big = asyncio.create_task(q.put(b"B" * 8))
    await asyncio.sleep(0)
    small = asyncio.create_task(q.put(b"s"))  # would fit, but waits behind the big one
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    assert not q.fits(b"s")
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(b"s")
    assert q.get_nowait() == b"a" * 6
    await asyncio.gather(big, small)  # both in now (8 + 1 bytes)
    assert [q.get_nowait(), q.get_nowait()] == [b"B" * 8, b"s"]


async def test_a_cancelled_put_leaves_nothing_and_lets_the_next_in():
    q = queue(maxbytes=10)
    q.put_nowait(b"a" * 5)
    big = asyncio.create_task(q.put(b"B" * 9))
    await asyncio.sleep(0)
    small = asyncio.create_task(q.put(b"s" * 4))
    await asyncio.sleep(0)
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    await small  # fits beside "aaaaa" once the big one no longer waits ahead of it
    assert [q.get_nowait(), q.get_nowait()] == [b"a" * 5, b"s" * 4] and q.empty()


async def test_a_put_cancelled_after_room_was_made_keeps_its_item_or_none_exactly():
    q = queue(maxbytes=10)
    q.put_nowait(b"a" * 5)
    put = asyncio.create_task(q.put(b"b" * 9))
    await asyncio.sleep(0)
    q.get_nowait()  # admitted: the item is queued before its task runs again
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert q.get_nowait() == b"b" * 9 and q.empty() and q.nbytes == 0

    # Cancelled first, then room made before its task ran: the item is not admitted.
    q.put_nowait(b"a" * 5)
    put = asyncio.create_task(q.put(b"c" * 9))
    await asyncio.sleep(0)
    put.cancel()
    assert q.get_nowait() == b"a" * 5
    with pytest.raises(asyncio.CancelledError):
        await put
    assert q.empty() and q.nbytes == 0 and q.fits(b"d" * 10)


async def test_a_getter_waits_for_an_item_and_a_cancelled_getter_passes_it_on():
    q = queue()
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait(b"x")  # wakes the first getter
    first.cancel()  # before it ran: it passes the item on
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == b"x"


def test_sizes_count_at_least_one_and_bounds_must_be_positive():
    q = BoundedQueue(100, 2, lambda item: 0)
    q.put_nowait(b"")
    q.put_nowait(b"")
    assert q.nbytes == 2 and q.full()
    for maxitems, maxbytes in ((0, 1), (1, 0)):
        with pytest.raises(ValueError):
            BoundedQueue(maxitems, maxbytes, len)


@settings(max_examples=200, deadline=None)
@given(
    maxitems=st.integers(1, 5),
    maxbytes=st.integers(1, 30),
    ops=st.lists(st.one_of(st.integers(1, 40), st.none()), max_size=60),
)
def test_whatever_is_put_and_taken_the_bounds_hold_and_order_is_kept(
    maxitems: int, maxbytes: int, ops: list[int | None]
):
    """Puts (a size) and gets (None), each put waiting when it must: at every step the queue
    holds at most ``maxitems`` items and ``maxbytes`` bytes, or one item alone; every item comes
    out once, in the order it was put."""

    async def run() -> None:
        q = BoundedQueue(maxitems, maxbytes, lambda item: item[1])
        puts: list[asyncio.Task[None]] = []
        taken: list[int] = []
        counter = 0
        for op in ops:
            if op is None:
                if not q.empty():
                    taken.append(q.get_nowait()[0])
            else:
                puts.append(asyncio.create_task(q.put((counter, op))))
                counter += 1
            await asyncio.sleep(0)
            assert q.qsize() <= maxitems
            assert q.nbytes <= maxbytes or q.qsize() == 1
        while len(taken) < counter:
            taken.append((await asyncio.wait_for(q.get(), 5))[0])
            await asyncio.sleep(0)
            assert q.nbytes <= maxbytes or q.qsize() <= 1
        await asyncio.gather(*puts)
        assert taken == list(range(counter))

    asyncio.run(run())
