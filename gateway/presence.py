"""Presence, the pure core: who is in a project, merged across tabs and pods, and the coalesced
diffs sent to subscribers. No I/O: :mod:`gateway.presence_store` runs it against Redis.

Three tables, each small and each tested on its own (tests/test_presence.py):

* :class:`PodTable` - this pod's tabs (``(session key, project)`` pairs) merged into one
  :class:`~schemas.presence.PodRecord` per member: what this pod writes to Redis.
* :class:`ProjectView` - a replica of one project's presence on every pod (this pod's records
  plus the other pods', kept current from their announcements), the merged member list, and
  what was last sent to subscribers: the base of the next :class:`~schemas.protocol.PresenceDiff`.
* :class:`PresenceCore` - both, plus the pending Redis writes and the presence subscribers.

Contracts that the whole design rests on (docs/presence.md):

* A member is a token subject; its tabs (on any pods) are one member. The activity shown is the
  one reported last (by any tab); ``since`` is the earliest join among its open tabs.
* Subscribers of a project all get the same diffs, computed once per project per interval and
  only from the members that changed (cost proportional to changes, not members). A subscriber's
  first ``presence`` is the state those diffs start from, so ``apply_diff`` over its messages
  reproduces the view exactly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

from schemas.presence import (
    DEFAULT_MAX_ANNOUNCEMENT,
    DIGEST_MODULUS,
    LISTED_PODS,
    MAX_MEMBER_ID_LENGTH,
    Announcement,
    PodRecord,
    PodState,
    fits_announcement,
    merge_member,
    merge_pods,
    read_limit,
    record_digest,
)
from schemas.protocol import Member, Presence, PresenceDiff, encode
from schemas.tokens import is_text

__all__ = [
    "PodTable",
    "PresenceCore",
    "ProjectView",
    "SessionKey",
    "Write",
    "apply_diff",
    "compute_diff",
]

#: How the gateway names a connection: any hashable (the session object itself will do).
SessionKey = Hashable


# --- diffs (the client's side of them too) ----------------------------------------------------


def compute_diff(
    project_id: int,
    old: Mapping[str, Member],
    new: Mapping[str, Member],
    candidates: Iterable[str] | None = None,
) -> PresenceDiff | None:
    """The diff that turns ``old`` into ``new``, or None when they are equal.

    ``candidates`` are the only ids that may differ (the ones touched since ``old``); None means
    compare everything. Lists are sorted by id so every pod sends the same bytes.
    """
    ids = set(old) | set(new) if candidates is None else set(candidates)
    joined: list[Member] = []
    left: list[str] = []
    changed: list[Member] = []
    for member_id in sorted(ids):
        before, after = old.get(member_id), new.get(member_id)
        if before is None and after is not None:
            joined.append(after)
        elif before is not None and after is None:
            left.append(member_id)
        elif before is not None and after is not None and before != after:
            changed.append(after)
    if not (joined or left or changed):
        return None
    return PresenceDiff(project_id=project_id, joined=joined, left=left, changed=changed)


def apply_diff(members: Mapping[str, Member], diff: PresenceDiff) -> dict[str, Member]:
    """What a client does with a ``presence_diff``: remove ``left``, put ``joined`` and
    ``changed``. Returns the new member table (the argument is not modified)."""
    result = dict(members)
    for member_id in diff.left:
        result.pop(member_id, None)
    for member in (*diff.joined, *diff.changed):
        result[member.id] = member
    return result


def presence_message(project_id: int, members: Mapping[str, Member]) -> Presence:
    return Presence(project_id=project_id, members=[members[k] for k in sorted(members)])


# --- this pod's tabs --------------------------------------------------------------------------


@dataclass(slots=True)
class _Tab:
    member_id: str
    name: str | None
    viewing: int | None
    answering: int | None
    since: int  # unix ms when the tab joined
    at: int  # unix ms of its last activity report (join counts as one; a move does not)
    closed: bool = False
    seq: int = 0  # the order of its last report on this pod (ties of ``at``: the later wins)


class _Member:
    """One member's tabs on this pod, kept so that its record costs the same whatever the
    number of tabs (one person may have thousands: a kiosk token shared by many screens)."""

    __slots__ = ("joined", "latest", "name", "tabs")

    def __init__(self) -> None:
        #: The display name of the latest token given here (a join, a move, a refresh with
        #: a new name): the person's, whichever tab reported last.
        self.name: str | None = None
        self.tabs: dict[SessionKey, _Tab] = {}
        #: A heap of (since, join order, tab): the earliest-joined open tab on top. Closed tabs
        #: are dropped when they reach the top, or all at once when they outnumber open ones.
        self.joined: list[tuple[int, int, _Tab]] = []
        #: A heap of (-at, -report order, tab): the tab that reported last on top, by when it
        #: reported (``at``), not by when it came here: a tab moved from another member brings
        #: its report's time. Entries of closed tabs, or of a tab's earlier reports, are
        #: dropped as above.
        self.latest: list[tuple[int, int, _Tab]] = []

    def reported(self, session: SessionKey, tab: _Tab, seq: int) -> None:
        self.tabs[session] = tab
        tab.seq = seq
        heapq.heappush(self.latest, (-tab.at, -seq, tab))
        if len(self.latest) > 2 * len(self.tabs) + 8:
            self._compact()

    def _compact(self) -> None:
        self.latest = [e for e in self.latest if not e[2].closed and -e[1] == e[2].seq]
        heapq.heapify(self.latest)

    def close(self, session: SessionKey) -> None:
        self.tabs.pop(session).closed = True
        if len(self.joined) > 2 * len(self.tabs) + 8:
            self.joined = [entry for entry in self.joined if not entry[2].closed]
            heapq.heapify(self.joined)
        if len(self.latest) > 2 * len(self.tabs) + 8:
            self._compact()

    def record(self) -> PodRecord:
        while self.latest[0][2].closed or -self.latest[0][1] != self.latest[0][2].seq:
            heapq.heappop(self.latest)
        latest = self.latest[0][2]
        while self.joined[0][2].closed:
            heapq.heappop(self.joined)
        return PodRecord(
            name=self.name,
            viewing=latest.viewing,
            answering=latest.answering,
            since=self.joined[0][0],
            at=latest.at,
        )


class PodTable:
    """This pod's tabs, one record per (project, member): the activity of the tab that reported
    last, ``since`` of the tab that joined first, and that tab's display name. Each change
    costs O(log tabs) of its member, never a pass over them."""

    def __init__(self) -> None:
        self._tabs: dict[tuple[SessionKey, int], _Tab] = {}
        self._members: dict[int, dict[str, _Member]] = {}
        self._sessions: dict[SessionKey, set[int]] = {}
        self._order = itertools.count()

    def record(self, project_id: int, member_id: str) -> PodRecord | None:
        member = self._members.get(project_id, {}).get(member_id)
        return None if member is None else member.record()

    def records(self, project_id: int) -> dict[str, PodRecord]:
        return {
            member_id: record
            for member_id in self._members.get(project_id, {})
            if (record := self.record(project_id, member_id)) is not None
        }

    def projects(self) -> list[int]:
        return list(self._members)

    def hosts(self, project_id: int, member_id: str) -> bool:
        """Whether a tab of ``member_id`` on this pod has joined the project."""
        return member_id in self._members.get(project_id, ())

    def member_count(self, project_id: int) -> int:
        """Members with a tab on this pod in the project."""
        return len(self._members.get(project_id, ()))

    def tab_count(self, project_id: int, member_id: str) -> int:
        """The member's tabs on this pod in the project."""
        member = self._members.get(project_id, {}).get(member_id)
        return 0 if member is None else len(member.tabs)

    def tab(self, session: SessionKey, project_id: int) -> _Tab | None:
        """The session's tab in the project (not to be changed), or None."""
        return self._tabs.get((session, project_id))

    def member_of(self, session: SessionKey, project_id: int) -> str | None:
        tab = self._tabs.get((session, project_id))
        return tab.member_id if tab else None

    def join(
        self,
        session: SessionKey,
        project_id: int,
        member_id: str,
        name: str | None,
        now_ms: int,
        *,
        viewing: int | None = None,
        answering: int | None = None,
        at: int | None = None,
    ) -> list[str]:
        """Add (or re-identify) a tab; returns the member ids whose record may have changed. A
        tab re-identified as another member moves to it with its activity. A new tab may bring
        the activity it reported before it was listed and when (``at``; default: ``now_ms``,
        the join being its report), as one that waited at the member cap does."""
        touched = []
        tab = self._tabs.get((session, project_id))
        if tab is not None:
            if tab.member_id == member_id:
                if tab.name == name:
                    return []
                # A new display name renames the person, and is no activity report: the
                # activity shown stays that of the tab that reported last.
                tab.name = name
                self._members[project_id][member_id].name = name
                return [member_id]
            # The token now names someone else: the tab moves to them, with its activity (the
            # tab's, for as long as the connection lives; a client sends it again only when it
            # changes) and when it was reported: the move is no report, and must not hide
            # what the person's other tabs reported since.
            viewing, answering, at = tab.viewing, tab.answering, tab.at
            touched = self.leave(session, project_id)
        elif at is None:
            at = now_ms
        tab = self._tabs[(session, project_id)] = _Tab(
            member_id, name, viewing, answering, now_ms, at
        )
        member = self._members.setdefault(project_id, {}).get(member_id)
        if member is None:
            member = self._members[project_id][member_id] = _Member()
        member.name = name
        member.reported(session, tab, next(self._order))
        heapq.heappush(member.joined, (now_ms, next(self._order), tab))
        self._sessions.setdefault(session, set()).add(project_id)
        return [*touched, member_id]

    def activity(
        self,
        session: SessionKey,
        project_id: int,
        viewing: int | None,
        answering: int | None,
        now_ms: int,
    ) -> list[str]:
        """Record a tab's activity; [] when the tab has not joined the project."""
        tab = self._tabs.get((session, project_id))
        if tab is None:
            return []
        tab.viewing, tab.answering = viewing, answering
        tab.at = now_ms
        self._members[project_id][tab.member_id].reported(session, tab, next(self._order))
        return [tab.member_id]

    def leave(self, session: SessionKey, project_id: int) -> list[str]:
        tab = self._tabs.pop((session, project_id), None)
        if tab is None:
            return []
        members = self._members[project_id]
        member = members[tab.member_id]
        member.close(session)
        if not member.tabs:
            del members[tab.member_id]
            if not members:
                del self._members[project_id]
        projects = self._sessions[session]
        projects.discard(project_id)
        if not projects:
            del self._sessions[session]
        return [tab.member_id]

    def projects_of(self, session: SessionKey) -> list[int]:
        return sorted(self._sessions.get(session, ()))


# --- one project's replica --------------------------------------------------------------------


def _fingerprint(announcement: Announcement) -> int:
    """Tells two announcements of one pod and version apart (O(changes), as applying it is)."""
    changes = announcement.changes
    return hash((announcement.base, None if changes is None else frozenset(changes.items())))


class ProjectView:
    """One project's presence as this pod knows it: every pod's records, merged members, and
    the members last sent to subscribers (``emitted``)."""

    #: A pod absent from this many consecutive refresh reports is dead (an absence or two may
    #: be a Redis flush or restart that the pod repairs at its next refresh).
    MISSES_BEFORE_DROP = 3

    def __init__(self, project_id: int, own_pod: str, most: int = read_limit()) -> None:
        self.project_id = project_id
        self.own_pod = own_pod
        #: The most members one other pod lists here, and the most other pods; all together
        #: list at most LISTED_PODS times that: more can only come from another writer (see
        #: :func:`schemas.presence.read_limit` and :func:`~schemas.presence.listed_limit`).
        self.most = most
        #: Announcements whose pod was dropped for taking the view past ``most``, and members
        #: an announcement added past ``listed_limit()`` (left out).
        self.left_out = 0
        self.pods: dict[str, dict[str, PodRecord]] = {}
        self.versions: dict[str, int] = {}
        self.loaded = False
        self.members: dict[str, Member] = {}
        self.emitted: dict[str, Member] | None = None
        self._frame: bytes | None = None  # ``snapshot()`` encoded, while ``emitted`` stays
        self._dirty: set[str] = set()  # members to re-merge
        self._unsent: set[str] = set()  # members that may differ from ``emitted``
        #: When a set (tabs wait at the cap on this pod): the members :meth:`current` found
        #: newly listed, for :meth:`PresenceCore.promote` (O(changes), not O(waiting)).
        self.arrivals: set[str] | None = None
        self._misses: dict[str, int] = {}
        self._behind: dict[str, int] = {}  # pod -> version Redis reported that we lacked
        #: Pods whose version here was ahead of Redis in the last report (pod -> that version).
        #: Never legitimate for long (a write stores its version before announcing it): a
        #: forged announcement. Ahead twice running, the next read replaces them whatever its
        #: version.
        self._ahead: dict[str, int] = {}
        self._distrusted: set[str] = set()
        self._early: list[Announcement] = []  # received while the first read is under way
        self._early_records = 0  # the records they carry, in all
        #: Announcements came past ``most`` of them (or their records past ``LISTED_PODS * most``)
        #: while the first read waited (not kept: the read is made again, which lists what they
        #: announced).
        self._early_dropped = False
        #: Members may be left out for the most members in all (an announcement's, or a read
        #: that listed that many): once there is room, the next refresh report asks for a read.
        self._cut = False
        #: pod -> (version, fingerprint) of the last announcement of it applied here.
        self._announced: dict[str, tuple[int, int]] = {}

    # updates

    def _touch(self, ids: Iterable[str]) -> None:
        self._dirty.update(ids)

    def set_record(self, pod: str, member_id: str, record: PodRecord | None) -> None:
        records = self.pods.setdefault(pod, {})
        if record is None:
            records.pop(member_id, None)
            if not records:
                del self.pods[pod]
        else:
            records[member_id] = record
        self._touch((member_id,))

    def replace_pod(self, pod: str, records: Mapping[str, PodRecord], version: int) -> None:
        self._touch(self.pods.pop(pod, {}))
        if records:
            self.pods[pod] = dict(records)
            self._touch(records)
        self.versions[pod] = version
        self._misses.pop(pod, None)

    def drop_pod(self, pod: str) -> None:
        self._touch(self.pods.pop(pod, {}))
        self.versions.pop(pod, None)
        self._announced.pop(pod, None)
        self._misses.pop(pod, None)
        self._behind.pop(pod, None)

    def apply(self, announcement: Announcement) -> bool:
        """Apply another pod's announcement; False when one was missed, or when it came
        without its records (a write too large to announce) and this view lacks its version:
        re-read the project."""
        pod = announcement.pod
        if pod == self.own_pod:
            return True
        if not self.loaded:
            # At most ``most`` of them, holding at most what a loaded view lists in all
            # (``listed_limit``): ``most`` of ``most`` records each were millions of records.
            records = len(announcement.changes or ())
            if (
                len(self._early) < self.most
                and self._early_records + records <= LISTED_PODS * self.most
            ):
                self._early.append(announcement)  # applied after the read, in order
                self._early_records += records
            else:  # (a channel flooded while Redis is slow: memory stays bounded)
                self._early_dropped = True
            return True
        known = self.versions.get(pod, 0)
        fingerprint = _fingerprint(announcement)
        if announcement.version <= known:
            seen = self._announced.get(pod)
            if seen is not None and seen[0] == announcement.version and seen[1] != fingerprint:
                # Two different announcements of one version: one is another writer's (a
                # pod announces each version once). Nothing else would tell: Redis reports
                # the same version. The read replaces the pod whatever its version.
                self._distrusted.add(pod)
                return False
            return True  # already have it (or newer), e.g. from a read
        if announcement.changes is None:
            return False  # its records are in Redis only
        if announcement.base != 0 and announcement.base != known:
            return False
        listed = self.current()
        fresh = [m for m, r in announcement.changes.items() if r is not None and m not in listed]
        if announcement.base == 0:
            records = {k: v for k, v in announcement.changes.items() if v is not None}
            self.replace_pod(pod, records, announcement.version)
        else:
            for member_id, record in announcement.changes.items():
                self.set_record(pod, member_id, record)
            self.versions[pod] = announcement.version
            self._misses.pop(pod, None)
        self._announced[pod] = (announcement.version, fingerprint)
        if len(self.pods.get(pod, ())) > self.most or len(self.versions) > self.most:
            # No pod lists that many, nor are there that many pods (pods with nothing listed
            # count too, as their versions are kept): another writer's
            # announcements. The pod goes, and the read that follows takes from Redis only what
            # pods can have written there.
            self.left_out += 1
            self.drop_pod(pod)
            return False
        over = len(self.current()) - LISTED_PODS * self.most
        if over > 0:
            # Past the most members in all (listed_limit()): the members this announcement
            # added are left out, as a read leaves them out. Pods without a view of the project
            # each admit up to the cap, so real pods may pass it: dropping the pod and
            # re-reading brought back the same cut, at every announcement, and showed the
            # pod's members leave who never left.
            for member_id in fresh[-over:]:
                self.set_record(pod, member_id, None)
            self.left_out += min(over, len(fresh))
            self._cut = self._cut or bool(fresh)
        return True

    def load(self, snapshot: Mapping[str, PodState], own_records: Mapping[str, PodRecord]) -> bool:
        """Install a read of the whole project (this pod's part comes from ``own_records``, which
        is fresher than Redis). A pod this view already knows at a newer version keeps it; a pod
        absent from the read is kept until :meth:`check_live` finds it dead.
        Announcements received before the first read are applied after it (at most ``most``
        of them, with at most ``LISTED_PODS * most`` records in all); False when one of them
        shows a gap, or more came (read again)."""
        # A pod absent from the read is kept: it may be rewriting what a Redis flush or restart
        # lost. Dead pods are dropped by check_live; pods that left announced it.
        for pod, state in snapshot.items():
            if pod != self.own_pod and (
                state.version >= self.versions.get(pod, 0) or pod in self._distrusted
            ):
                self.replace_pod(pod, state.records, state.version)
                self._announced.pop(pod, None)  # (this version is Redis's, not announced)
        for pod in self._distrusted - set(snapshot):
            self.drop_pod(pod)  # its version here is forged, and Redis no longer has it
        self.replace_pod(self.own_pod, own_records, 0)
        self._behind.clear()
        self._ahead.clear()
        self._distrusted.clear()
        self.loaded = True
        # A read lists at most that many in all: as many may mean some were left out.
        self._cut = len(self.current()) >= LISTED_PODS * self.most
        early, self._early, self._early_records = self._early, [], 0
        dropped, self._early_dropped = self._early_dropped, False
        return all([self.apply(announcement) for announcement in early]) and not dropped

    def check_live(self, live: Mapping[str, int]) -> bool:
        """Compare with a refresh's report of live pods and their versions: drop pods missing
        :data:`MISSES_BEFORE_DROP` times in a row; True when a pod has stayed ahead of this view
        since the previous report (an announcement was lost), or this view has stayed ahead of
        Redis (a forged announcement): re-read the project."""
        # Pods with records here, and pods whose last member left (their version is kept
        # for as long as a read made before the leave may come back, then forgotten).
        for pod in [p for p in self.versions if p != self.own_pod and p not in live]:
            misses = self._misses.get(pod, 0) + 1
            if misses >= self.MISSES_BEFORE_DROP:
                self.drop_pod(pod)
            else:
                self._misses[pod] = misses
        stale = False
        behind: dict[str, int] = {}
        ahead: dict[str, int] = {}
        for pod, version in live.items():
            if pod == self.own_pod:
                continue
            self._misses.pop(pod, None)
            known = self.versions.get(pod, 0)
            if version > known:
                behind[pod] = version
                # An announcement may still be in flight; behind twice running, it was lost.
                previous = self._behind.get(pod)
                if previous is not None and known < previous:
                    stale = True
            elif version < known:
                ahead[pod] = known
                if self._ahead.get(pod) == known:
                    self._distrusted.add(pod)
                    stale = True
        self._behind = behind
        self._ahead = ahead
        if self._cut and len(self.current()) < LISTED_PODS * self.most:
            # Room for members left out while the view was full (others left since): a read
            # lists them, as it lists them to anyone else. Asked here, at most once per
            # refresh interval, not at each leave: a large project's read is not cheap.
            self._cut = False
            stale = True
        return stale

    # reading

    def listed_elsewhere(self, member_id: str) -> bool:
        """Whether another pod's records list the member."""
        return any(
            member_id in records for pod, records in self.pods.items() if pod != self.own_pod
        )

    def current(self) -> dict[str, Member]:
        """The merged members, re-merging only those touched since the last call."""
        for member_id in self._dirty:
            records = [
                (pod, recs[member_id]) for pod, recs in self.pods.items() if member_id in recs
            ]
            if records:
                if self.arrivals is not None and member_id not in self.members:
                    self.arrivals.add(member_id)
                self.members[member_id] = merge_member(member_id, records)
            else:
                self.members.pop(member_id, None)
        self._unsent |= self._dirty
        self._dirty.clear()
        return self.members

    def snapshot(self) -> Presence:
        """What a new subscriber (or ``presence_get``) receives: the state the next diff
        applies to."""
        if self.emitted is None:
            self.emitted = dict(self.current())
            self._unsent.clear()
        return presence_message(self.project_id, self.emitted)

    def snapshot_frame(self) -> bytes:
        """:meth:`snapshot` encoded, built once per state: every new subscriber and every
        ``presence_get`` of a large project would otherwise encode the whole list again."""
        if self._frame is None or self.emitted is None:
            self._frame = encode(self.snapshot())
        return self._frame

    def take_diff(self) -> PresenceDiff | None:
        """The changes since the last snapshot/diff, or None; afterwards they count as sent."""
        current = self.current()
        if self.emitted is None:
            return None  # nobody has a base yet
        diff = compute_diff(self.project_id, self.emitted, current, self._unsent)
        self._unsent.clear()
        if diff is not None:
            self._frame = None
            for member_id in diff.left:
                del self.emitted[member_id]
            for member in (*diff.joined, *diff.changed):
                self.emitted[member.id] = member
        return diff


# --- everything ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiting:
    """A tab refused a place at the member cap (:meth:`PresenceCore.wait`): who it would be
    listed as, under which cap, and the activity it reported meanwhile, and when: listed, it
    reports nothing new (its arrival counts as a report, as a join does)."""

    member_id: str
    name: str | None
    cap: int
    viewing: int | None
    answering: int | None
    at: int  # unix ms of its last report (its arrival, or activity)
    reported: int  # the order of that report on this pod (ties of ``at``: the later wins)


@dataclass(frozen=True, slots=True)
class Write:
    """One project's pending write (:data:`schemas.presence.WRITE`): ``changes`` (member id ->
    record, None for gone) turn version ``base`` into ``version``; base 0 replaces the pod's
    whole member list, which ``changes`` then is. ``announce``: whether the announcement of
    the write carries ``changes`` (False: they take more than the pod's bound, and the other
    pods read the project instead; :func:`schemas.presence.fits_announcement`). A write that
    leaves the pod no member in the project and would not fit is a replacement with nothing
    instead (base 0, no changes), always announced: every pod drops the pod at once."""

    project_id: int
    base: int
    version: int
    changes: dict[str, PodRecord | None]
    announce: bool = True


class PresenceCore:
    """The whole presence state of one pod, driven by the gateway's calls and Redis replies.

    Not thread-safe; one event loop drives it. Time comes from ``clock_ms`` (unix ms).

    ``view_linger_ms``: how long a project's view stays after its last presence subscriber left
    (kept current, and dropped by :meth:`sweep`), so that a subscriber who comes back, or a
    client subscribing and unsubscribing in a loop, costs no new read of the whole project;
    0 drops it at once.

    ``max_announcement``: the most bytes of changes a write's announcement carries
    (``--presence-max-announcement``); a larger write is announced without them (see
    :class:`Write`).
    """

    def __init__(
        self,
        pod_id: str,
        clock_ms: Callable[[], int],
        view_linger_ms: int = 0,
        most: int = read_limit(),
        max_announcement: int = DEFAULT_MAX_ANNOUNCEMENT,
    ) -> None:
        self.pod_id = pod_id
        self.max_announcement = max_announcement
        #: The most members of one pod, and the most pods, a view takes
        #: (:func:`schemas.presence.read_limit`).
        self.most = most
        self._clock_ms = clock_ms
        self.view_linger_ms = view_linger_ms
        #: project -> when (unix ms) its view's last subscriber left: dropped by :meth:`sweep`.
        self._idle: dict[int, int] = {}
        self.table = PodTable()
        self.views: dict[int, ProjectView] = {}
        self.subscribers: dict[int, set[SessionKey]] = {}
        # The other way round, so that a closing connection costs its own projects, not all.
        self._subscribed: dict[SessionKey, set[int]] = {}
        self._pending: dict[int, set[str]] = {}  # project -> members to write
        self._stored: dict[int, int] = {}  # project -> our version in Redis (absent: unknown)
        #: Projects this pod has no member in any more whose records in Redis may still list
        #: members: the write that removes them did not apply and waits for the next refresh
        #: (``written(..., retry=False)``). The refresh plan carries them until it is applied.
        self._unsettled: set[int] = set()
        self._versions = itertools.count(1)
        #: project -> tabs refused a place at the cap, in arrival order (:meth:`wait`).
        self._waiting: dict[int, dict[SessionKey, _Waiting]] = {}
        #: project -> member -> their tabs in ``_waiting`` (so that listing a person costs
        #: their tabs, not every waiting one).
        self._waiting_members: dict[int, dict[str, dict[SessionKey, None]]] = {}
        self._waits_of: dict[SessionKey, set[int]] = {}
        self._reports = itertools.count(1)
        #: project -> [records_digest() of this pod's records there, member -> its part], as
        #: of the last refresh_counts(); and the members changed there since.
        self._digests: dict[int, tuple[list[int], dict[str, int]]] = {}
        self._undigested: dict[int, set[str]] = {}
        #: project -> refreshes counted there (refresh_counts' digest_every), from the
        #: project's id: the projects' content checks fall on different rounds.
        self._refreshes: dict[int, int] = {}

    # the connection lifecycle

    def join(self, session: SessionKey, project_id: int, member_id: str, name: str | None) -> None:
        """List a tab as ``member_id``. Raises ``ValueError`` for an empty id, one longer than
        :data:`~schemas.presence.MAX_MEMBER_ID_LENGTH` (see :meth:`can_list`), or an id or name
        that is not text (:func:`schemas.tokens.is_text`; ``verify_token`` passes neither on):
        one such record would fail the write of every project of the pod, and the diffs.
        A tab waiting for a place (:meth:`wait`) is listed with the activity it reported
        meanwhile, and when it reported it: being listed is no report."""
        self._check(member_id, name)
        self._join(session, project_id, member_id, name)
        # The person is listed here now: their tabs waiting here need no place.
        self._list_waiting(project_id, member_id)

    def _join(self, session: SessionKey, project_id: int, member_id: str, name: str | None) -> None:
        waiting = self._waiting.get(project_id, {}).get(session)
        if waiting is None:
            touched = self.table.join(session, project_id, member_id, name, self._now())
        else:
            self._unwait(session, project_id)
            touched = self.table.join(
                session,
                project_id,
                member_id,
                name,
                self._now(),
                viewing=waiting.viewing,
                answering=waiting.answering,
                at=waiting.at,
            )
        self._changed(project_id, touched)

    def _list_waiting(self, project_id: int, member_id: str) -> int:
        """List the member's tabs waiting in the project, in the order they reported (the
        last shows), each with what and when it reported; returns how many."""
        sessions = self._waiting_members.get(project_id, {}).get(member_id)
        if not sessions:
            return 0
        waiting = self._waiting[project_id]
        tabs = sorted(((s, waiting[s]) for s in sessions), key=lambda entry: entry[1].reported)
        for session, tab in tabs:
            self._join(session, project_id, tab.member_id, tab.name)  # (ends the wait)
        return len(tabs)

    def _check(self, member_id: str, name: str | None) -> None:
        if not self.can_list(member_id):
            raise ValueError(
                f"a member needs an id of 1 to {MAX_MEMBER_ID_LENGTH} characters of text "
                "(the token's sub)"
            )
        if name is not None and not is_text(name):
            raise ValueError("a display name must be text")

    def wait(
        self, session: SessionKey, project_id: int, member_id: str, name: str | None, cap: int
    ) -> None:
        """The tab is not listed (:meth:`is_full` refused ``member_id`` a place under ``cap``;
        it leaves whatever member it was listed as) but waits for a place: :meth:`promote`
        lists it once the project has room, with the activity it reported meanwhile. A join,
        a leave or the connection's close ends the wait. Raises ``ValueError`` as :meth:`join`
        does, now: not later, in :meth:`promote`, on the diff loop."""
        self._check(member_id, name)
        # The tab's activity goes with it (a tab listed as another person until its token
        # was refreshed, or one waiting already).
        before = self._waiting.get(project_id, {}).get(session)
        if before is not None and before.member_id == member_id:
            # (a re-subscribe: the tab keeps its place in the queue)
            before.name, before.cap = name, cap
            return
        tab = self.table.tab(session, project_id)
        if before is not None:
            activity = before.viewing, before.answering, before.at, before.reported
        elif tab is not None:
            activity = tab.viewing, tab.answering, tab.at, next(self._reports)
        else:
            activity = None, None, self._now(), next(self._reports)
        self.leave(session, project_id)
        self._waiting.setdefault(project_id, {})[session] = _Waiting(
            member_id, name, cap, *activity
        )
        members = self._waiting_members.setdefault(project_id, {})
        members.setdefault(member_id, {})[session] = None
        view = self.views.get(project_id)
        if view is not None and view.arrivals is None:
            view.arrivals = set()
        self._waits_of.setdefault(session, set()).add(project_id)

    def promote(self) -> int:
        """List the waiting tabs of every project that has room now, in the order they came
        (a tab of a member listed meanwhile is listed too); returns how many were listed. Call
        once per diff interval: a place freed by a leave here, or on another pod that this
        pod's view of the project shows, is taken within one."""
        promoted = 0
        for project_id in list(self._waiting):
            # People another pod lists meanwhile need no place: their tabs here are listed
            # (O(members newly listed), from the view).
            view = self.views.get(project_id)
            if view is not None and view.loaded:
                view.current()
                arrivals, view.arrivals = view.arrivals or set(), set()
                for member_id in arrivals:
                    if member_id in view.members:
                        promoted += self._list_waiting(project_id, member_id)
            # O(tabs listed), not O(tabs waiting): with no place for a new member the project
            # is left at once.
            while (waiting := self._waiting.get(project_id)) is not None:
                first = next(iter(waiting.values()))
                if not self._listed(project_id, first.member_id) and self._no_place(
                    project_id, first.cap
                ):
                    break
                # The person's every waiting tab here takes the one place, in the order they
                # reported, with what and when they reported: the promotion is no report (it
                # must not hide what the person's other tabs reported since).
                promoted += self._list_waiting(project_id, first.member_id)
        return promoted

    def _unwait(self, session: SessionKey, project_id: int) -> None:
        waiting = self._waiting.get(project_id)
        tab = None if waiting is None else waiting.pop(session, None)
        if tab is None:
            return
        if not waiting:
            del self._waiting[project_id]
            if (view := self.views.get(project_id)) is not None:
                view.arrivals = None  # (no tab waits there any more)
        members = self._waiting_members[project_id]
        sessions = members[tab.member_id]
        del sessions[session]
        if not sessions:
            del members[tab.member_id]
            if not members:
                del self._waiting_members[project_id]
        projects = self._waits_of[session]
        projects.discard(project_id)
        if not projects:
            del self._waits_of[session]

    @staticmethod
    def can_list(member_id: str | None) -> bool:
        """Whether ``member_id`` (a token's ``sub``) can be listed: 1 to
        :data:`~schemas.presence.MAX_MEMBER_ID_LENGTH` characters of text."""
        return bool(member_id) and len(member_id) <= MAX_MEMBER_ID_LENGTH and is_text(member_id)

    def is_full(
        self, project_id: int, member_id: str, cap: int, session: SessionKey | None = None
    ) -> bool:
        """Whether listing ``member_id`` would take the project past ``cap`` members, as far as
        this pod knows: from its view of every pod when it has one, else from its own tabs.
        Approximate across pods (joins on several pods within one write interval may pass
        the cap by a few); a member already listed is never refused. With ``session``, a tab
        moving to ``member_id`` from the only tab of another member (a refreshed token naming
        someone else) frees that member's place. While tabs of other people wait here
        (:meth:`wait`), a new person waits behind them, whatever the room: a place freed
        goes to who came first, at the next :meth:`promote`."""
        if self._listed(project_id, member_id):
            return False
        view = self.views.get(project_id)
        moving = None if session is None else self.table.member_of(session, project_id)
        if (
            moving is not None
            and self.table.tab_count(project_id, moving) == 1
            and not (view is not None and view.listed_elsewhere(moving))
        ):
            # (it takes the place it frees: no one waiting is passed over)
            known = view.current() if view is not None and view.loaded else {}
            listed = len(known) - (moving in known)
            return max(listed, self.table.member_count(project_id) - 1) >= cap
        waiting = self._waiting_members.get(project_id)
        if waiting and (len(waiting) > 1 or member_id not in waiting):
            return True
        return self._no_place(project_id, cap)

    def _listed(self, project_id: int, member_id: str) -> bool:
        """Whether the member is listed, as far as this pod knows (here, or in its view)."""
        if self.table.hosts(project_id, member_id):
            return True
        view = self.views.get(project_id)
        return view is not None and view.loaded and member_id in view.current()

    def _no_place(self, project_id: int, cap: int) -> bool:
        """Whether the project has ``cap`` members or more, as far as this pod knows."""
        view = self.views.get(project_id)
        # (current(), not members: the joins and leaves since the last tick count too)
        listed = len(view.current()) if view is not None and view.loaded else 0
        return max(listed, self.table.member_count(project_id)) >= cap

    def activity(
        self, session: SessionKey, project_id: int, viewing: int | None, answering: int | None
    ) -> bool:
        """False when the session has not joined the project (nothing changes; a tab waiting
        for a place keeps it for when it is listed)."""
        waiting = self._waiting.get(project_id, {}).get(session)
        if waiting is not None:
            waiting.viewing, waiting.answering = viewing, answering
            waiting.at, waiting.reported = self._now(), next(self._reports)
            return False
        touched = self.table.activity(session, project_id, viewing, answering, self._now())
        self._changed(project_id, touched)
        return bool(touched)

    def leave(self, session: SessionKey, project_id: int) -> None:
        self._unwait(session, project_id)
        self._changed(project_id, self.table.leave(session, project_id))

    def unsubscribe(self, session: SessionKey, project_id: int) -> bool:
        """Stop the session's presence messages of the project. True when it was the last
        subscriber and the view is dropped (the caller stops listening to the project): at once
        without ``view_linger_ms``, else later, by :meth:`sweep`."""
        subscribers = self.subscribers.get(project_id)
        if not subscribers or session not in subscribers:
            return False
        subscribers.discard(session)
        projects = self._subscribed[session]
        projects.discard(project_id)
        if not projects:
            del self._subscribed[session]
        if subscribers:
            return False
        del self.subscribers[project_id]
        if self.view_linger_ms > 0:
            self._idle[project_id] = self._now()
            return False
        del self.views[project_id]
        return True

    def sweep(self) -> list[int]:
        """Drop the views whose last subscriber left ``view_linger_ms`` ago or more; returns
        their projects (the caller stops listening to them). Call once per diff interval."""
        if not self._idle:
            return []
        deadline = self._now() - self.view_linger_ms
        dropped = []
        for project_id, since in list(self._idle.items()):
            if since > deadline:
                continue
            del self._idle[project_id]
            if (
                not self.subscribers.get(project_id)
                and self.views.pop(project_id, None) is not None
            ):
                dropped.append(project_id)
        return dropped

    def close_session(self, session: SessionKey) -> list[int]:
        """The connection closed: it leaves every project; returns the projects whose view was
        dropped (stop listening to them)."""
        for project_id in self.table.projects_of(session):
            self.leave(session, project_id)
        for project_id in sorted(self._waits_of.get(session, ())):
            self._unwait(session, project_id)
        projects = sorted(self._subscribed.get(session, ()))
        return [p for p in projects if self.unsubscribe(session, p)]

    # presence subscriptions

    def view(self, project_id: int) -> ProjectView:
        """The project's view, created empty (not ``loaded``) when absent."""
        view = self.views.get(project_id)
        if view is None:
            view = self.views[project_id] = ProjectView(project_id, self.pod_id, self.most)
            if project_id in self._waiting:
                view.arrivals = set()
            view.replace_pod(self.pod_id, self.table.records(project_id), 0)
        return view

    def subscribe(self, session: SessionKey, project_id: int) -> Presence:
        """Add a presence subscriber to a loaded view; returns its first message."""
        view = self.views[project_id]
        if not view.loaded:
            raise RuntimeError("load the project's view before subscribing to it")
        self.subscribers.setdefault(project_id, set()).add(session)
        self._subscribed.setdefault(session, set()).add(project_id)
        self._idle.pop(project_id, None)
        return view.snapshot()

    def load(self, project_id: int, snapshot: Mapping[str, PodState]) -> bool:
        """Install a read of the project; False when it must be read again."""
        return self.view(project_id).load(snapshot, self.table.records(project_id))

    def first_read_done(self, project_id: int) -> None:
        """The read a subscriber waited for has answered: a view nobody is subscribed to then
        (the subscribers that asked for it stopped waiting) is idle from now on, and
        :meth:`sweep` drops it after ``view_linger_ms`` unless one subscribes. (Not at any
        :meth:`load`: a re-read may load a view whose first read a subscriber still waits
        for.)"""
        if project_id in self.views and not self.subscribers.get(project_id):
            self._idle.setdefault(project_id, self._now())

    def snapshot_of_read(self, project_id: int, snapshot: Mapping[str, PodState]) -> Presence:
        """A ``presence`` answer from a Redis read, for a project without a view (this pod's
        part from its own table, fresher than Redis)."""
        pods = {pod: state.records for pod, state in snapshot.items() if pod != self.pod_id}
        own = self.table.records(project_id)
        if own:
            pods[self.pod_id] = own
        return presence_message(project_id, merge_pods(pods))

    def on_announcement(self, project_id: int, announcement: Announcement) -> bool:
        """False when the project must be re-read (an announcement was missed)."""
        view = self.views.get(project_id)
        return view is None or view.apply(announcement)

    def tick(self) -> list[tuple[list[SessionKey], PresenceDiff]]:
        """Once per diff interval: each subscribed project's diff and who receives it (a view
        whose last subscriber left moves on too, sending nothing)."""
        out = []
        for project_id, sessions in self.subscribers.items():
            view = self.views.get(project_id)
            if view is None or not view.loaded:
                continue
            diff = view.take_diff()
            if diff is not None:
                out.append((list(sessions), diff))
        for project_id in self._idle:
            # Nobody to send to, but its state moves on as a subscribed one's would: the next
            # subscriber's first message and ``presence_get`` stay at most an interval old.
            view = self.views.get(project_id)
            if view is not None and view.loaded:
                view.take_diff()
        return out

    # Redis writes and refreshes

    def take_writes(self, which: Callable[[int], bool] | None = None) -> list[Write]:
        """The pending writes, one per project (only of the projects ``which`` accepts, the
        others left pending); afterwards call :meth:`written` with each."""
        writes = []
        taken = []
        for project_id, members in self._pending.items():
            if which is not None and not which(project_id):
                continue
            taken.append(project_id)
            base = self._stored.get(project_id, 0)
            if base == 0:
                changes: dict[str, PodRecord | None] = dict(self.table.records(project_id))
            else:
                changes = {m: self.table.record(project_id, m) for m in sorted(members)}
            announce = fits_announcement(changes, self.max_announcement)
            if not announce and not self.table.member_count(project_id):
                # The pod's last members leave: written as a replacement with nothing, whose
                # announcement ('{}', base 0) every pod applies. Without records, the pods'
                # read found the pod gone from Redis (a write that empties a pod removes it),
                # which a view keeps as after a flush, until refreshes miss it three times.
                base, changes, announce = 0, {}, True
            writes.append(Write(project_id, base, next(self._versions), changes, announce))
        if len(taken) == len(self._pending):
            self._pending.clear()
        else:
            for project_id in taken:
                del self._pending[project_id]
        return writes

    def written(self, write: Write, ok: bool, *, retry: bool = True) -> None:
        """The outcome of a write: False (refused because Redis lost our records, or failed)
        means the next write of the project replaces our whole member list; with ``retry``
        that write is pending now, else it waits for the next refresh (:meth:`refresh_failed`
        or a refused :meth:`refreshed`), which finds our records missing."""
        project_id = write.project_id
        if ok:
            self._unsettled.discard(project_id)
        if ok and self.table.member_count(project_id):  # (not records(): O(members))
            self._stored[project_id] = write.version
            return
        self._stored.pop(project_id, None)
        if not ok and retry:
            self._pending.setdefault(project_id, set())
        elif not ok and not self.table.member_count(project_id):
            # No member left here, so no refresh would carry the project: it is carried until
            # the write that empties the pod's records there is applied (else the members
            # listed there stay listed until the records expire, as for a dead pod).
            self._unsettled.add(project_id)

    def refresh_plan(self) -> dict[int, int | None]:
        """Projects to refresh: ours (with the version we expect stored; 0 = not written yet,
        or to be written again) and the ones we only watch (None). A project whose last
        member left while the write could not be applied is ours until that write is (0:
        the refresh that answers asks for it)."""
        plan: dict[int, int | None] = dict.fromkeys(self.views)
        for project_id in self._unsettled:
            plan[project_id] = 0
        for project_id in self.table.projects():
            plan[project_id] = self._stored.get(project_id, 0)
        return plan

    def refresh_counts(
        self,
        plan: Mapping[int, int | None],
        outstanding: Iterable[int] = (),
        *,
        digest_every: int = 1,
    ) -> dict[int, tuple[int, int | str]]:
        """What this pod has stored in the projects of ``plan`` it has written and has no
        write pending in (nor ``outstanding``): how many records (its members there) and their
        :func:`~schemas.presence.records_digest`, or ``""`` (not checked) but at every
        ``digest_every``-th refresh of the project. The refresh checks both (a record another
        writer added to the pod's hash, put in place of one, or changed, would otherwise be
        listed by every read for as long as the pod lives). A project's digest is updated
        with the records that changed since the last refresh: O(changes), not O(members).
        Redis, though, hashes every record of the pod's hash to compare it (~1.8 µs each):
        checked at every refresh, a million records would take Redis about 60 % of its time
        at the 3 s interval; every tenth (:data:`gateway.presence_store.DIGEST_EVERY`), 6 %,
        and the count, which Redis reads for nothing, is still checked every time."""
        skip = set(outstanding)
        out: dict[int, tuple[int, int | str]] = {}
        refreshes = self._refreshes
        for project_id, version in plan.items():
            if version and project_id not in self._pending and project_id not in skip:
                rounds = refreshes[project_id] = refreshes.get(project_id, project_id) + 1
                due = rounds % digest_every == 0
                out[project_id] = (
                    self.table.member_count(project_id),
                    self._digest(project_id) if due else "",
                )
        return out

    def _digest(self, project_id: int) -> int:
        total, parts = self._digests.setdefault(project_id, ([0], {}))
        for member_id in self._undigested.pop(project_id, ()):
            total[0] -= parts.pop(member_id, 0)
            record = self.table.record(project_id, member_id)
            if record is not None:
                parts[member_id] = record_digest(member_id, record)
                total[0] += parts[member_id]
        total[0] %= DIGEST_MODULUS
        return total[0]

    def refreshed(self, project_id: int, ok: bool, live: Mapping[str, int]) -> bool:
        """Apply a refresh reply; True when the project's view must be re-read."""
        if not ok:
            self._stored.pop(project_id, None)  # Redis lost our records: write them again
            self._pending.setdefault(project_id, set())
        view = self.views.get(project_id)
        return view is not None and view.loaded and view.check_live(live)

    def refresh_failed(self, project_id: int) -> None:
        """The project's refresh answered an error: our records there are written whole again
        (the view is left as it is: the error says nothing of which pods are alive)."""
        self._stored.pop(project_id, None)
        if self.table.member_count(project_id):
            self._pending.setdefault(project_id, set())

    def write_whole(self, project_ids: Iterable[int]) -> None:
        """The projects' next write replaces this pod's whole member list there (for one whose
        last member left, the write that empties it), pending now instead of waiting for a
        refresh to find the records missing (:meth:`written` without ``retry``): for a drain,
        after which no refresh comes."""
        for project_id in project_ids:
            self._stored.pop(project_id, None)
            self._pending.setdefault(project_id, set())

    def has_pending_writes(self) -> bool:
        return bool(self._pending)

    def pending_projects(self) -> Iterable[int]:
        """The projects with a pending write (a view: do not change the writes while reading)."""
        return self._pending.keys()

    def stored_versions(self) -> dict[int, int]:
        return dict(self._stored)

    # internals

    def _now(self) -> int:
        return self._clock_ms()

    def _changed(self, project_id: int, members: list[str]) -> None:
        if not members:
            return
        if self.table.member_count(project_id):
            self._undigested.setdefault(project_id, set()).update(members)
        else:  # (the digest of nothing: the next members are all changes)
            self._digests.pop(project_id, None)
            self._undigested.pop(project_id, None)
            self._refreshes.pop(project_id, None)
        self._pending.setdefault(project_id, set()).update(members)
        view = self.views.get(project_id)
        if view is not None:
            for member_id in members:
                view.set_record(self.pod_id, member_id, self.table.record(project_id, member_id))
