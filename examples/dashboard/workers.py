"""The demo's background threads: the simulated agents and the expiry sweeper. Each is a small
loop over the database, so a restart picks up exactly where the previous process stopped. (The
outbox relay is the library's: :class:`publisher.outbox.OutboxRelay`, started by ``DemoApp``;
the agents learn of answers through :class:`examples.dashboard.answers.AnswerListener`.)
"""

from __future__ import annotations

import logging
import random
import threading
import time

from examples.dashboard.store import REVIEWER_PREFIX, Conflict, Store

__all__ = ["AgentSimulation", "ExpirySweeper"]

log = logging.getLogger("examples.dashboard")


class _Loop(threading.Thread):
    """A daemon thread that calls ``step()`` every ``interval`` seconds until stopped."""

    interval = 1.0

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stopping = threading.Event()
        self._wake = threading.Event()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                delay = self.step()
            except Exception:
                log.exception("%s failed; retrying", self.name)
                delay = self.interval
            self._wake.wait(self.interval if delay is None else delay)
            self._wake.clear()

    def step(self) -> float | None:
        raise NotImplementedError


_TASKS = (
    "Implement authentication",
    "Add rate limiting to the public API",
    "Migrate sessions table to Postgres",
    "Build the billing page",
    "Write end-to-end tests for checkout",
    "Set up structured logging",
    "Design the notification settings screen",
    "Cache product search results",
    "Add CSV export to reports",
    "Harden file upload validation",
)
_QUESTIONS = (
    "Should we use JWT or sessions?",
    "Which error format should the API return: RFC 7807 or our own?",
    "Is it fine to drop support for IE11 in this component?",
    "Should retries be idempotent by request id or by payload hash?",
    "Which time zone should reports use by default?",
    "Can I add a new dependency (pydantic) for validation?",
    "Do we keep soft-deleted rows forever or purge after 30 days?",
    "Should the export include archived projects?",
    "What is the maximum upload size we want to allow?",
    "Which feature flag service should this use?",
)


_REVIEWER_ANSWERS = (
    "Go with the simpler option; we can revisit it later.",
    "Follow what the rest of the codebase does.",
    "Yes, go ahead.",
    "No, keep the current behaviour for now.",
)


class AgentSimulation(_Loop):
    """Simulated agents: they resume shortly after their blocker is resolved and, when
    ``active``, work on tasks and raise SYNC and ASYNC blockers now and then.

    An agent learns that its blocker was answered from :meth:`answered` (the
    :class:`~examples.dashboard.answers.AnswerListener` calls it for every ``blocker_resolved``
    it receives from the bus) or from :meth:`reload` (the database, after a resync), and resumes
    ``resume_delay`` seconds after the answer. Resuming always runs (also with
    ``active=False``), because that is the agent's reaction to a resolution, which tests
    exercise without the random activity.

    So that the demo never goes quiet while nobody answers, when ``active``:

    * a *simulated reviewer* answers every ASYNC blocker ``reviewer_delay`` seconds after it was
      raised (its answers start with :data:`REVIEWER_PREFIX`; SYNC blockers are left to the
      person at the dashboard, and expire if nobody answers);
    * at most ``len(agents) - 1`` SYNC blockers are pending at a time: the last agent free of a
      SYNC blocker raises ASYNC ones, which the reviewer answers, so events keep flowing.
    """

    interval = 0.2

    def __init__(
        self,
        store: Store,
        project_id: int,
        *,
        active: bool = True,
        resume_delay: float = 2.0,
        work_time: tuple[float, float] = (8.0, 25.0),
        idle_time: tuple[float, float] = (1.0, 4.0),
        sync_ratio: float = 0.4,
        max_pending: int = 6,
        reviewer_delay: float | None = 45.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("agents")
        self.store = store
        self.project_id = project_id
        self.active = active
        self.resume_delay = resume_delay
        self.work_time = work_time
        self.idle_time = idle_time
        self.sync_ratio = sync_ratio
        self.max_pending = max_pending
        self.reviewer_delay = reviewer_delay
        self.rng = rng or random.Random()
        self._answered: dict[int, float] = {}  # blocker id -> when its agent resumes
        self._answered_lock = threading.Lock()

    def answered(self, blocker_id: int, at: float | None = None) -> None:
        """Blocker ``blocker_id`` was answered (at ``at``, unix seconds; now by default): its
        agent resumes ``resume_delay`` later. Thread-safe; repeating it changes nothing."""
        due = (time.time() if at is None else at) + self.resume_delay
        with self._answered_lock:
            self._answered.setdefault(blocker_id, due)
        self.wake()

    def reload(self) -> None:
        """Read from the database the answered blockers whose agent has not resumed (what the
        events would have said: after a resync, and when the listener first subscribes)."""
        for blocker_id, resolved_ts in self.store.answered_waiting(self.project_id):
            self.answered(blocker_id, resolved_ts)

    def _resume_due(self) -> None:
        now = time.time()
        with self._answered_lock:
            due = sorted(b for b, at in self._answered.items() if at <= now)
            for blocker_id in due:
                del self._answered[blocker_id]
        for position, blocker_id in enumerate(due):
            try:
                self.store.resume_agent(blocker_id)  # at most once per blocker, whoever asks
            except Exception:
                # (the database was busy, say): these agents resume at the next step instead
                with self._answered_lock:
                    for waiting in due[position:]:
                        self._answered.setdefault(waiting, now)
                raise

    def _later(self) -> float:
        return time.time() + self.rng.uniform(*self.work_time)

    def step(self) -> float | None:
        self._resume_due()
        if not self.active:
            return None
        self._review()
        now = time.time()
        agents = [a for a in self.store.agent_rows() if a["project_id"] == self.project_id]
        for agent in agents:
            if agent["next_action_at"] > now:
                continue
            if agent["status"] == "idle":
                self.store.start_task(agent["id"], self.rng.choice(_TASKS), self._later())
            elif agent["status"] == "working":
                pending = self.store.blockers(self.project_id)
                if len(pending) < self.max_pending and self.rng.random() < 0.75:
                    sync_pending = sum(b["blocker_type"] == "SYNC" for b in pending)
                    sync_allowed = sync_pending < len(agents) - 1
                    kind = (
                        "SYNC" if sync_allowed and self.rng.random() < self.sync_ratio else "ASYNC"
                    )
                    try:
                        self.store.create_blocker(
                            self.project_id, agent["id"], kind, self.rng.choice(_QUESTIONS)
                        )
                    except Conflict:
                        pass
                    self.store.set_next_action(agent["id"], self._later())
                else:
                    self.store.finish_task(agent["id"])
                    self.store.set_next_action(agent["id"], now + self.rng.uniform(*self.idle_time))
        return None

    def _review(self) -> None:
        if not self.reviewer_delay:
            return
        for blocker_id in self.store.pending_async_before(
            self.project_id, time.time() - self.reviewer_delay
        ):
            answer = REVIEWER_PREFIX + self.rng.choice(_REVIEWER_ANSWERS)
            try:
                self.store.resolve_blocker(blocker_id, answer)
            except Conflict:
                pass  # answered or expired meanwhile


class ExpirySweeper(_Loop):
    """Expires blockers pending longer than ``max_age`` seconds (24 h by default)."""

    def __init__(self, store: Store, max_age: float, interval: float | None = None) -> None:
        super().__init__("expiry-sweeper")
        self.store = store
        self.max_age = max_age
        # Checking a few times per lifetime keeps the lateness of an expiry small relative to it.
        self.interval = interval if interval is not None else max(0.2, min(60.0, max_age / 10))

    def step(self) -> float | None:
        for blocker_id in self.store.expire_due(self.max_age):
            log.info("blocker %s expired", blocker_id)
        return None
