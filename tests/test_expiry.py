"""The shared token-expiry timer (gateway.expiry), without sockets: a clock of the test's own
drives :meth:`ExpiryWheel.sweep`; one test lets the event loop run the sweeps itself."""

from __future__ import annotations

import asyncio

import pytest

from gateway.expiry import ExpiryWheel


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wheel(clock: Clock, tick: float = 1.0) -> tuple[ExpiryWheel[str], list[str]]:
    expired: list[str] = []
    return ExpiryWheel(expired.append, tick=tick, clock=clock), expired


async def test_expires_exactly_once_never_early_at_most_a_tick_late():
    clock = Clock(1_000_000.0)
    w, expired = wheel(clock)
    slots = {name: w.add(name, at) for name, at in [("a", 1_000_010), ("b", 1_000_010.5)]}
    # Every instant before a deadline: nothing expires.
    for step in range(0, 100):
        w.sweep(1_000_000.0 + step * 0.1)
    assert expired == []
    w.sweep(1_000_009.999)
    assert expired == []
    w.sweep(1_000_010.0)  # at its deadline
    assert expired == ["a"]
    w.sweep(1_000_010.4)
    assert expired == ["a"]  # b's deadline (10.5) has not come
    w.sweep(1_000_011.0)  # one tick after 10.0: b is due, at most 0.5 s late
    assert sorted(expired) == ["a", "b"]
    for later in (1_000_011.0, 1_000_012.0, 1_000_100.0):
        w.sweep(later)
    assert sorted(expired) == ["a", "b"]  # once each
    assert len(w) == 0
    w.remove("a", slots["a"])  # removing an expired key is harmless
    w.close()


async def test_refresh_moves_the_deadline_both_ways():
    clock = Clock(0.0)
    w, expired = wheel(clock)
    slot = w.add("tab", 100)
    slot = w.add("tab", 200, slot)  # a refreshed token, later
    w.sweep(150)
    assert expired == []
    w.sweep(200)
    assert expired == ["tab"]
    slot = w.add("tab2", 300)
    slot = w.add("tab2", 250, slot)  # a refresh may also expire sooner
    w.sweep(250)
    assert expired == ["tab", "tab2"]
    w.sweep(300)
    assert expired == ["tab", "tab2"]
    same = w.add("tab3", 400)
    assert w.add("tab3", 400, same) == same  # the same deadline again: one entry
    w.sweep(400)
    assert expired == ["tab", "tab2", "tab3"]
    w.close()


async def test_a_removed_key_never_expires():
    w, expired = wheel(Clock(0.0))
    slot = w.add("closed", 10)
    kept = w.add("open", 10)
    w.remove("closed", slot)
    w.remove("never-added", kept)
    w.remove("closed", None)
    w.sweep(1_000)
    assert expired == ["open"]
    w.close()


async def test_a_deadline_already_past_expires_on_the_next_sweep():
    # A token is accepted up to its verification leeway past ``exp``.
    w, expired = wheel(Clock(100.0))
    w.add("late", 97)
    w.sweep()
    assert expired == ["late"]
    w.close()


async def test_a_failing_expire_does_not_keep_the_others():
    calls: list[str] = []

    def expire(key: str) -> None:
        calls.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    w = ExpiryWheel(expire, clock=Clock(0.0))
    for key in ("bad", "good1", "good2"):
        w.add(key, 5)
    assert w.sweep(5) == 3
    assert sorted(calls) == ["bad", "good1", "good2"]
    w.close()


async def test_the_event_loop_sweeps_while_keys_are_pending():
    import time

    expired = asyncio.Event()
    seen: list[str] = []

    def expire(key: str) -> None:
        seen.append(key)
        expired.set()

    w = ExpiryWheel(expire, tick=0.05)
    added = time.time()
    w.add("k", added + 0.1)
    await asyncio.wait_for(expired.wait(), 5)
    assert seen == ["k"]
    assert time.time() >= added + 0.1
    assert w._handle is None  # nothing pending: the sweeps stopped
    w.close()


def test_tick_must_be_positive():
    with pytest.raises(ValueError):
        ExpiryWheel(lambda key: None, tick=0)
