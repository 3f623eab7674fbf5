"""The keepalive's clock, without sockets: a ping unanswered for ``timeout`` of the time the
gateway was reading closes the connection; time it held reading paused does not count."""

from __future__ import annotations

from gateway.keepalive import Keepalive

INTERVAL, TIMEOUT = 1.0, 2.0


class FakeSession:
    """A session added to a keepalive at time 0 (``base`` on the loop's clock), whose reading
    was paused over ``pauses`` ((start, end) in seconds from 0; end None: still paused), and
    whose pings are answered when a test says so."""

    def __init__(self) -> None:
        self.base = 0.0
        self.pauses: list[tuple[float, float | None]] = []
        self.sent: list[bytes] = []
        self.answered: set[bytes] = set()
        self.open = True

    def is_open(self) -> bool:
        return self.open

    def ping(self, now: float) -> bytes:
        self.sent.append(str(len(self.sent)).encode())
        return self.sent[-1]

    def ping_unanswered(self, data: bytes) -> bool:
        return data not in self.answered

    def read_paused_for(self, now: float) -> float:
        t = now - self.base
        return sum(
            min(t, t if end is None else end) - start for start, end in self.pauses if start < t
        )


class Clock:
    """One session in a keepalive; ``run(t)`` is the keepalive's tick at ``t`` s after it was
    added (its first ping is due at ``INTERVAL``)."""

    def __init__(self) -> None:
        self.timed_out: list[FakeSession] = []
        self.keepalive = Keepalive(INTERVAL, TIMEOUT, self._timeout)
        self.session = FakeSession()
        self.keepalive.add(self.session)  # type: ignore[arg-type]
        self.session.base = self.keepalive._pings[0][0] - INTERVAL

    def _timeout(self, session) -> None:
        self.timed_out.append(session)
        session.open = False  # as the gateway's abort does

    def run(self, *times: float) -> None:
        for t in times:
            self.keepalive._run(self.session.base + t)


async def test_an_unanswered_ping_closes_after_the_timeout():
    clock = Clock()
    clock.run(1.0, 2.99)  # the first ping at 1 s
    assert clock.timed_out == []
    clock.run(3.0)
    assert clock.timed_out == [clock.session]


async def test_answered_pings_never_close():
    clock = Clock()
    for tick in range(1, 20):
        clock.run(float(tick))
        clock.session.answered.update(clock.session.sent)  # each pong within the interval
    assert clock.timed_out == []


async def test_time_reading_was_paused_moves_the_deadline_back_by_as_much():
    # The ping at 1 s has its deadline at 3 s; reading was paused from 1.5 s to 4.5 s (the
    # connection's backlog waiting for Redis), so it is due at 6 s, not before.
    clock = Clock()
    clock.session.pauses = [(1.5, 4.5)]
    clock.run(1.0, 2.0, 3.0, 4.0, 5.0, 5.99)
    assert clock.timed_out == []
    clock.run(6.0)
    assert clock.timed_out == [clock.session]


async def test_no_ping_closes_while_reading_stays_paused_and_one_does_once_it_resumes():
    clock = Clock()
    clock.session.pauses = [(1.5, None)]
    clock.run(*(float(t) for t in range(1, 101)))
    assert clock.timed_out == []
    # Reading resumes at 100 s. The first ping (1 s) had had 0.5 s of reading: 1.5 s to go.
    clock.session.pauses = [(1.5, 100.0)]
    clock.run(101.0, 101.49)
    assert clock.timed_out == []
    clock.run(101.5)
    assert clock.timed_out == [clock.session]


async def test_pauses_add_up_and_a_ping_sent_while_paused_waits_for_reading_time():
    # Paused 0.5-1.5 s and 2-3 s: the ping sent at 1 s (while paused) has had its 2 s of
    # reading at 1-1.5 paused, 1.5-2 reading (0.5), 2-3 paused, 3-4.5 reading (1.5): at 4.5 s.
    clock = Clock()
    clock.session.pauses = [(0.5, 1.5), (2.0, 3.0)]
    clock.run(1.0, 2.0, 3.0, 4.0, 4.49)
    assert clock.timed_out == []
    clock.run(4.5)
    assert clock.timed_out == [clock.session]


async def test_a_pong_read_once_reading_resumes_answers_the_pings_sent_meanwhile():
    clock = Clock()
    clock.session.pauses = [(0.5, None)]
    clock.run(*(float(t) for t in range(1, 10)))
    clock.session.pauses = [(0.5, 9.5)]
    clock.session.answered.update(clock.session.sent)  # the pongs that waited, read at once
    for tick in range(10, 20):
        clock.run(float(tick))
        clock.session.answered.update(clock.session.sent)
    assert clock.timed_out == []
    assert not clock.keepalive._deferred
