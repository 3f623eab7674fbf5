"""gateway.lanes: which of a connection's frames wait behind the ones waiting for Redis.

A model transport drives :class:`FrameLanes` as gateway.websocket does (frames handled at once
or held; a frame that waits for Redis becomes a task that asks ``next`` when it is done), and
hypothesis plays every order of arrivals and Redis answers against the rules the clients rely
on: a project's frames are handled in their order, each after the one before is done; a
barrier after everything before it and before anything after it; a free frame at once; never
more than ``concurrency`` projects waiting for Redis at once; and nothing lost or done twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.lanes import BARRIER, FREE, FrameLanes


@dataclass(eq=False)
class Frame:
    index: int
    lane: object  # a project, BARRIER or FREE
    project: int  # the project it names (a barrier's too: a subscribe at the limit)
    waits: bool  # it waits for Redis when handled
    started_at: int | None = None  # the step it was handled at
    done_at: int | None = None  # the step it was done at


@dataclass
class Transport:
    """gateway.websocket's part: handle, start tasks, ask ``next`` when a task's frame is done."""

    lanes: FrameLanes
    step: int = 0
    #: task id -> (its lane, the frame it waits for)
    tasks: dict[int, tuple[object, Frame]] = field(default_factory=dict)
    next_task: int = 0
    frames: list[Frame] = field(default_factory=list)
    peak_running: int = 0

    def tick(self) -> int:
        self.step += 1
        return self.step

    def arrive(self, lane: object, project: int, waits: bool) -> None:
        frame = Frame(len(self.frames), lane, project, waits and lane is not FREE)
        self.frames.append(frame)
        if not self.lanes.busy and not self.tasks:
            admitted = True  # (no lanes: every frame handled at once)
        else:
            admitted = self.lanes.admit(lane, frame)
        if admitted:
            if self.handle(frame):
                lane = BARRIER if lane is BARRIER else frame.project
                self.lanes.started(lane)
                self.tasks[self.next_task] = (lane, frame)
                self.next_task += 1
        self.peak_running = max(self.peak_running, self.running_projects())

    def handle(self, frame: Frame) -> bool:
        """Whether it waits for Redis (else it is done at once)."""
        frame.started_at = self.tick()
        if not frame.waits:
            frame.done_at = self.tick()
        return frame.waits

    def answer(self, task: int) -> None:
        """Redis answers the frame ``task`` waits for; the task goes on as _work does."""
        lane, frame = self.tasks.pop(task)
        frame.done_at = self.tick()
        while True:
            turn = self.lanes.next(lane)
            if turn is None:
                break
            lane, frame = turn
            if self.handle(frame):
                self.tasks[task] = (lane, frame)
                break
        self.peak_running = max(self.peak_running, self.running_projects())

    def running_projects(self) -> int:
        return len({lane for lane, _ in self.tasks.values() if lane is not BARRIER})


lanes_ = st.one_of(st.just(FREE), st.just(BARRIER), st.integers(0, 4))
arrivals = st.tuples(st.just("arrive"), lanes_, st.integers(0, 4), st.booleans())
answers = st.tuples(st.just("answer"), st.integers(0, 50))


@settings(max_examples=600, deadline=None)
@given(concurrency=st.integers(1, 3), steps=st.lists(st.one_of(arrivals, answers), max_size=60))
def test_frames_keep_the_order_the_clients_rely_on(concurrency, steps):
    transport = Transport(FrameLanes(concurrency, backlog=4))
    for step in steps:
        if step[0] == "arrive":
            _, lane, project, waits = step
            if lane is not FREE and lane is not BARRIER:
                project = lane
            transport.arrive(lane, project, waits)
        elif transport.tasks:
            tasks = sorted(transport.tasks)
            transport.answer(tasks[step[1] % len(tasks)])
        waiting = sum(1 for f in transport.frames if f.started_at is None)
        assert transport.lanes.waiting == waiting
    while transport.tasks:  # Redis answers what is left, oldest task first
        transport.answer(min(transport.tasks))
    frames = transport.frames
    assert all(f.started_at is not None and f.done_at is not None for f in frames)
    assert not transport.lanes.busy and transport.lanes.waiting == 0
    assert transport.peak_running <= concurrency
    for frame in frames:
        earlier, later = frames[: frame.index], frames[frame.index + 1 :]
        if frame.lane is FREE:
            assert frame.started_at == min(f.started_at for f in frames[frame.index :])
        elif frame.lane is BARRIER:
            # After everything before it (but free frames) is done; nothing after it (but free
            # frames) started before it is done.
            assert all(f.done_at < frame.started_at for f in earlier if f.lane is not FREE)
            assert all(f.started_at > frame.done_at for f in later if f.lane is not FREE)
        else:
            same = [f for f in earlier if f.lane == frame.lane]
            assert all(f.done_at < frame.started_at for f in same), "a project's order broken"


def test_a_project_s_frames_wait_while_other_projects_go_on():
    lanes: FrameLanes[str] = FrameLanes(concurrency=8, backlog=4)
    lanes.started(1)  # a subscribe of project 1 waits for Redis
    assert lanes.busy and lanes.projects() == {1}
    assert not lanes.admit(1, "unsubscribe 1")  # held: after its subscribe
    assert lanes.admit(2, "subscribe 2")  # another project: at once
    assert lanes.admit(FREE, "ping")
    assert lanes.waiting == 1 and not lanes.full
    assert lanes.next(1) == (1, "unsubscribe 1")
    assert lanes.next(1) is None
    assert not lanes.busy


def test_a_barrier_waits_for_everything_before_and_holds_everything_after():
    lanes: FrameLanes[str] = FrameLanes(concurrency=8, backlog=8)
    lanes.started(1)
    lanes.started(2)
    assert not lanes.admit(BARRIER, "auth")
    assert not lanes.admit(3, "subscribe 3")  # after the auth, though project 3 is idle
    assert lanes.admit(FREE, "ping")
    assert lanes.next(1) is None  # project 2 still runs: the barrier waits
    assert lanes.next(2) == (BARRIER, "auth")
    assert not lanes.admit(4, "subscribe 4")  # while the frames from the barrier on run
    assert lanes.next(BARRIER) == (BARRIER, "subscribe 3")
    assert lanes.next(BARRIER) == (BARRIER, "subscribe 4")
    assert lanes.next(BARRIER) is None
    assert not lanes.busy
    assert lanes.admit(3, "subscribe 3")  # lanes again


def test_past_the_concurrency_a_project_waits_for_a_place_in_order():
    lanes: FrameLanes[str] = FrameLanes(concurrency=2, backlog=8)
    lanes.started(1)
    lanes.started(2)
    assert not lanes.admit(3, "subscribe 3")
    assert not lanes.admit(4, "subscribe 4")
    assert not lanes.admit(3, "unsubscribe 3")
    assert lanes.projects() == {1, 2, 3, 4}
    assert lanes.next(2) == (3, "subscribe 3")  # the place goes to the oldest waiting project
    assert lanes.next(3) == (3, "unsubscribe 3")
    assert lanes.next(3) == (4, "subscribe 4")
    assert lanes.next(4) is None
    assert lanes.next(1) is None
    assert not lanes.busy


def test_full_and_roomy_tell_the_transport_when_to_stop_and_resume_reading():
    lanes: FrameLanes[str] = FrameLanes(concurrency=1, backlog=4)
    lanes.started(1)
    for i in range(4):
        assert not lanes.admit(1, f"frame {i}")
    assert lanes.full and not lanes.roomy
    lanes.next(1)
    lanes.next(1)
    assert not lanes.full and not lanes.roomy  # 2 held: not below half yet
    lanes.next(1)
    assert lanes.roomy


def test_clear_drops_what_is_held():
    lanes: FrameLanes[str] = FrameLanes(concurrency=1, backlog=4)
    lanes.started(1)
    lanes.admit(2, "a")
    lanes.admit(BARRIER, "b")
    assert sorted(lanes.clear()) == ["a", "b"]
    assert not lanes.busy


def test_a_barrier_that_waits_for_redis_holds_what_comes_after_it():
    lanes: FrameLanes[str] = FrameLanes(concurrency=8, backlog=8)
    lanes.started(BARRIER)  # a subscribe at the limit, handled while nothing else was busy
    assert lanes.busy and lanes.projects() == set()
    assert not lanes.admit(2, "unsubscribe 2")  # (in order: after that subscribe's answer)
    assert lanes.admit(FREE, "ping")
    assert lanes.next(BARRIER) == (BARRIER, "unsubscribe 2")
    assert lanes.next(BARRIER) is None
    assert not lanes.busy and lanes.admit(2, "subscribe 2")


def test_what_cannot_wait_for_redis_is_refused():
    lanes: FrameLanes[str] = FrameLanes(concurrency=1, backlog=4)
    with pytest.raises(ValueError):
        lanes.started(FREE)
    lanes.started(1)
    with pytest.raises(ValueError):
        lanes.started(1)
    with pytest.raises(ValueError):
        lanes.started(BARRIER)  # (only when nothing else is busy)
    with pytest.raises(ValueError):
        FrameLanes(concurrency=0, backlog=4)


# --- the subscription limit: ClientProtocol.lane_of with FrameLanes ---------------------------


def _sequential(frames, limit: int, followed: set[int]) -> dict[int, str]:
    """Each subscribe's outcome with the frames handled one after the other."""
    projects, outcome = set(followed), {}
    for index, (kind, project, waits, succeeds) in enumerate(frames):
        if kind == "subscribe":
            if project not in projects and len(projects) >= limit:
                outcome[index] = "too_many_subscriptions"
            elif waits and not succeeds:
                projects.discard(project)
                outcome[index] = "unavailable"
            else:
                projects.add(project)
                outcome[index] = "subscribed"
        elif kind == "unsubscribe":
            projects.discard(project)
    return outcome


def _with_lanes(frames, limit: int, followed: set[int], schedule) -> dict[int, str]:
    """The same frames as gateway.websocket runs them: classified by ``lane_of`` on arrival,
    held or handled, a frame waiting for Redis in a task (a subscribe's limit checked when the
    task starts, its project followed from then, dropped if Redis fails it), arrivals and the
    tasks' steps in the order ``schedule`` draws."""
    from types import SimpleNamespace

    from gateway.clients import ClientProtocol
    from schemas.protocol import PresenceGet, Subscribe, Unsubscribe

    protocol = SimpleNamespace(config=SimpleNamespace(max_subscriptions=limit))
    session = SimpleNamespace(projects=set(followed))
    projects = session.projects
    messages = {"subscribe": Subscribe, "unsubscribe": Unsubscribe, "presence_get": PresenceGet}
    outcome: dict[int, str] = {}
    lanes: FrameLanes | None = None
    tasks: list[list] = []  # [lane, frame index, stage: "start" or "wait"]

    def lane_of(index: int, busy) -> object:
        kind, project = frames[index][:2]
        message = messages[kind](project_id=project)
        return ClientProtocol.lane_of(protocol, session, message, busy)  # type: ignore[arg-type]

    def handle(index: int) -> bool:
        """Whether the frame waits for Redis (else it is done)."""
        kind, project, waits, _ = frames[index]
        if kind == "unsubscribe":
            projects.discard(project)
            return False
        if kind == "subscribe" and not waits:  # from the feed's memory
            if project not in projects and len(projects) >= limit:
                outcome[index] = "too_many_subscriptions"
            else:
                projects.add(project)
                outcome[index] = "subscribed"
            return False
        return True

    def step(task: list) -> None:
        nonlocal lanes
        _, index, stage = task
        kind, project, _, succeeds = frames[index]
        if stage == "start":
            task[2] = "wait"
            if kind != "subscribe":
                return
            if project in projects or len(projects) < limit:
                projects.add(project)
                return
            outcome[index] = "too_many_subscriptions"
        elif kind == "subscribe":
            if not succeeds:
                projects.discard(project)
            outcome[index] = "subscribed" if succeeds else "unavailable"
        assert lanes is not None
        while True:
            turn = lanes.next(task[0])
            if turn is None:
                tasks.remove(task)
                if not lanes.busy:
                    lanes = None
                return
            task[0], index = turn
            if handle(index):
                task[1], task[2] = index, "start"
                return

    arrivals = list(range(len(frames)))
    while arrivals or tasks:
        if arrivals and (not tasks or schedule.random() < 0.5):
            index = arrivals.pop(0)
            if lanes is not None:
                lane = lane_of(index, lanes.projects())
                if not lanes.admit(lane, index):
                    continue
            if handle(index):
                if lanes is None:
                    lanes = FrameLanes(concurrency=2, backlog=4)
                    lane = lane_of(index, ())
                lanes.started(lane)
                tasks.append([lane, index, "start"])
        else:
            step(schedule.choice(tasks))
    return outcome


client_frames = st.tuples(
    st.sampled_from(["subscribe", "subscribe", "unsubscribe", "presence_get"]),
    st.integers(1, 4),
    st.booleans(),  # a subscribe waits for Redis (presence_get always does)
    st.booleans(),  # ... and Redis answers it (else: unavailable)
).map(lambda f: (f[0], f[1], f[2] or f[0] == "presence_get", f[3] or f[0] == "presence_get"))


@settings(max_examples=800, deadline=None)
@given(
    frames=st.lists(client_frames, max_size=12),
    limit=st.integers(1, 3),
    followed=st.sets(st.integers(1, 4), max_size=3),
    schedule=st.randoms(use_true_random=False),
)
def test_the_subscription_limit_answers_as_if_frames_were_handled_one_after_the_other(
    frames, limit, followed, schedule
):
    # A subscribe near --max-subscriptions is a barrier (ClientProtocol.lane_of): whatever the
    # order of arrivals and Redis answers, each subscribe is accepted or refused for the limit
    # as it would be with the connection's frames handled one after the other.
    followed = set(sorted(followed)[:limit])
    assert _with_lanes(frames, limit, followed, schedule) == _sequential(frames, limit, followed)
