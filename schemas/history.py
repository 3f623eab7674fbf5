"""A page of a project's history, without I/O: the cursor query, the atomic read, the plan.

Shared by the gateway's polling fallback (``GET /v1/projects/{id}/events`` with a browser
token, :mod:`gateway.http`) and the publisher's HTTP API (the same path with a backend's API
key, :mod:`publisher.http_api`), so that both take the same query (``epoch=&after=&tag=&limit=``)
and answer the same :class:`schemas.protocol.PollResponse` from the same read
(:data:`schemas.lua.SNAPSHOT`): a client pages through either one alike, and gets the same
``resync_required`` for a cursor of another epoch, one the retained history no longer reaches,
or one that names an event the history no longer holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qs

import msgspec

from schemas.protocol import MAX_SEQ, PollResponse, ResyncReason, ResyncRequired
from schemas.stored import (
    MAX_ENTRY_BYTES,
    CheckedFrames,
    ForeignKind,
    ForeignValue,
    parse_meta,
    parse_stream_entries,
)
from schemas.tags import event_tag, is_tag, tags_differ

__all__ = [
    "DEFAULT_PAGE_BYTES",
    "DEFAULT_POLL_LIMIT",
    "MAX_PAGE_BYTES",
    "MAX_POLL_LIMIT",
    "NO_HISTORY_TTL_MS",
    "Entry",
    "PollPlan",
    "PollQuery",
    "Resync",
    "Snapshot",
    "SnapshotUnreadable",
    "check_page",
    "other_event_at_cursor",
    "parse_poll_query",
    "parse_snapshot_reply",
    "plan_poll",
    "poll_response",
    "snapshot_args",
]

Entry = tuple[int, bytes]  # (seq, frame)

#: The most events one page (a poll's ``limit``) may ask for, and the page size without one.
MAX_POLL_LIMIT = 1000
DEFAULT_POLL_LIMIT = 100
#: Bytes of stored events one page carries at most, by default (a single larger event is still
#: a page; the rest is paged on with ``more``), and at most: a page's answer adds to its events'
#: bytes a comma per event and its own fields (about 1 KiB at 1,000 events), and eventbus.js
#: reads a poll answer of up to 4 MiB; 64 KiB leaves room.
DEFAULT_PAGE_BYTES = 1_048_576
MAX_PAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024
#: Lifetime of the history a read creates for a project that has none (see ``lua.SNAPSHOT``).
NO_HISTORY_TTL_MS = 24 * 3600 * 1000

_DECIMAL = re.compile(r"[0-9]+")  # ASCII only (re's [0-9], unlike str.isdigit and \d)
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
_QUERY_NAMES = frozenset(("epoch", "after", "tag", "limit"))
_AFTER_RANGE = f"after must be an integer from 0 to {MAX_SEQ}"
_LIMIT_RANGE = f"limit must be an integer from 1 to {MAX_POLL_LIMIT}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One atomic read of a project's history: its cursor, and entries after a given seq."""

    epoch: str
    top: int
    #: Valid entries, in order, up to the top and before ``corrupt_at``.
    entries: Sequence[Entry] = ()
    created: bool = False  # the history did not exist and was created by this read
    #: The first entry at or below the top that is not an event (a foreign value written by
    #: someone else): it can never be delivered, so whoever needs it is told to resync.
    corrupt_at: int | None = None
    #: How many stream entries the read returned, valid or not (compared with its limit to know
    #: whether the read was cut short). ``None``: as many as ``entries``.
    scanned: int | None = None
    #: The tag (schemas.tags) of the event at ``top``, and of the event at the cursor the read
    #: was made for (its ``after``); ``None`` when unknown (no such event, or not read).
    top_tag: str | None = None
    after_tag: str | None = None

    @property
    def read_count(self) -> int:
        return len(self.entries) if self.scanned is None else self.scanned


@dataclass(frozen=True, slots=True)
class Resync:
    """Tell subscribers to reload state and continue after ``(epoch, seq)``."""

    reason: ResyncReason
    epoch: str
    seq: int
    #: The tag of the event at ``seq``, when known.
    tag: str | None = None


def other_event_at_cursor(after: int | None, tag: str | None, snapshot: Snapshot) -> bool:
    """Whether the history holds, at the cursor ``after``, another event than the one the client
    tagged ``tag`` (schemas.tags): its numbers were handed out again after a failover lost
    events. Unknown either side (no tag, or the event is no longer held) is not a mismatch."""
    return after is not None and tags_differ(tag, snapshot.after_tag)


@dataclass(frozen=True, slots=True)
class PollPlan:
    """Answer to one poll: events after the cursor (a page), or a resync."""

    events: list[Entry]
    resync: Resync | None
    more: bool
    #: The tag of the event at the cursor to poll with next: the last of ``events``, or the
    #: top's when there are none (``None`` when unknown).
    tag: str | None = None


def plan_poll(
    epoch: str | None,
    after: int | None,
    snapshot: Snapshot,
    limit: int,
    tag: str | None = None,
) -> PollPlan:
    """Like :func:`plan_subscription`, for the HTTP fallback: pages of ``limit`` events instead of
    a bounded replay, so a poller never falls "too far behind" while the stream holds its cursor.

    ``snapshot.entries`` must be the entries after ``after``, at most ``limit`` (fewer when the
    read was cut short by bytes: the page then ends before the top, and says ``more``).
    """
    top = snapshot.top
    top_tag = snapshot.top_tag

    def resync(reason: ResyncReason) -> PollPlan:
        return PollPlan([], Resync(reason, snapshot.epoch, top, top_tag), False, top_tag)

    if epoch is None or after is None:
        return PollPlan([], None, False, top_tag)
    if epoch != snapshot.epoch:
        return resync(ResyncReason.EPOCH_CHANGED)
    if after > top or other_event_at_cursor(after, tag, snapshot):
        return resync(ResyncReason.HISTORY_LOST)
    entries = list(snapshot.entries)[:limit]
    if after < top and snapshot.corrupt_at == after + 1:
        # The next entry is not an event; the valid ones before a corrupt one are paged first.
        return resync(ResyncReason.HISTORY_CORRUPT)
    # Only the run that follows the cursor without a hole: an entry missing from the middle of
    # the stream (deleted by hand) ends the page before it, and the next poll, which starts at
    # the hole, gets ``history_trimmed`` (as a subscribe and a feed do), never a silent skip.
    for count, (seq, _) in enumerate(entries):
        if seq != after + 1 + count:
            del entries[count:]
            break
    if after < top and not entries:
        return resync(ResyncReason.HISTORY_TRIMMED)
    if not entries:  # at the top: the client's own tag, if it is still that event's
        return PollPlan([], None, False, top_tag)
    last = entries[-1][0]
    return PollPlan(entries, None, last < top, event_tag(entries[-1][1]))


class PollQuery(NamedTuple):
    """A poll's query: the cursor (``epoch``, ``after``, optionally ``tag``) and the page size."""

    epoch: str | None
    after: int | None
    tag: str | None
    limit: int


def parse_poll_query(query: str) -> PollQuery:
    """The query string of a page request (``epoch=&after=&tag=&limit=``, all optional; the
    cursor's ``epoch`` and ``after`` together), or ``ValueError`` with a message for the
    client: an unknown or repeated parameter, a malformed epoch or tag, an ``after`` that is
    not an integer from 0 to MAX_SEQ, a ``limit`` not from 1 to :data:`MAX_POLL_LIMIT`. An
    empty value is the parameter's absence."""
    params = parse_qs(query, keep_blank_values=True, max_num_fields=10)
    unknown = set(params) - _QUERY_NAMES
    if unknown:
        # (An empty name, ``?=1``, is named so: else the message ended in nothing.)
        names = ", ".join(name or '""' for name in sorted(unknown))
        raise ValueError(f"unknown query parameters: {names}")

    def one(name: str) -> str | None:
        values = params.get(name)
        if not values:
            return None
        # Before the blank check: ``after=&after=5`` is a repeated parameter too (which counts?)
        if len(values) > 1:
            raise ValueError(f"{name} given more than once")
        return values[0] or None

    epoch, raw_after, raw_limit = one("epoch"), one("after"), one("limit")
    tag = one("tag")
    # ASCII digits only: str.isdigit() and int() also take other scripts' digits (Arabic-Indic,
    # fullwidth), isdigit() superscripts that int() then refuses with a message of its own, and
    # int() refuses more than 4,300 digits likewise. Leading zeros are a number's own (a
    # cursor padded to a fixed width was refused as out of range, a message that misled).
    after: int | None = None
    if raw_after is not None:
        if not _DECIMAL.fullmatch(raw_after) or len(raw_after.lstrip("0")) > 16:
            raise ValueError(_AFTER_RANGE)
        after = int(raw_after.lstrip("0") or "0")
    limit = DEFAULT_POLL_LIMIT
    if raw_limit is not None:
        if not _DECIMAL.fullmatch(raw_limit) or len(raw_limit.lstrip("0")) > 4:
            raise ValueError(_LIMIT_RANGE)
        limit = int(raw_limit.lstrip("0") or "0")
    check_page(epoch, after, tag, limit)
    return PollQuery(epoch, after, tag, limit)


def check_page(epoch: str | None, after: int | None, tag: str | None, limit: int) -> None:
    """``ValueError`` with a message for the client unless the cursor and page size are
    valid: ``epoch`` and ``after`` together or neither, ``epoch`` 1-64 characters of
    ``[A-Za-z0-9_-]``, ``after`` from 0 to MAX_SEQ (as a subscribe's), ``tag`` (16 hex digits)
    only with them, ``limit`` from 1 to :data:`MAX_POLL_LIMIT`."""
    if (epoch is None) != (after is None):
        raise ValueError("give both epoch and after, or neither")
    if tag is not None and (epoch is None or not is_tag(tag)):
        raise ValueError("tag: 16 hex digits (the tag of the event at after), given with after")
    if epoch is not None and not (isinstance(epoch, str) and _EPOCH.fullmatch(epoch)):
        raise ValueError("epoch is malformed")
    if after is not None and not (_is_int(after) and 0 <= after <= MAX_SEQ):
        raise ValueError(_AFTER_RANGE)
    if not (_is_int(limit) and 1 <= limit <= MAX_POLL_LIMIT):
        raise ValueError(_LIMIT_RANGE)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def poll_response(project_id: int, snapshot: Snapshot, plan: PollPlan) -> PollResponse:
    """The answer to a page request: the page of ``plan`` (events embedded as stored, never
    re-encoded), or its ``resync_required``, with the project's cursor from ``snapshot``."""
    resync = None
    if plan.resync is not None:
        resync = ResyncRequired(
            project_id=project_id,
            reason=plan.resync.reason,
            epoch=plan.resync.epoch,
            seq=plan.resync.seq,
            tag=plan.resync.tag,
        )
    return PollResponse(
        project_id=project_id,
        epoch=snapshot.epoch,
        seq=snapshot.top,
        events=[msgspec.Raw(frame) for _, frame in plan.events],
        resync_required=resync,
        more=plan.more,
        tag=plan.tag,
    )


def snapshot_args(
    epoch: str | None, after: int | None, limit: int, candidate_epoch: str, max_bytes: int = 0
) -> list[str | int]:
    """The ARGV of :data:`schemas.lua.SNAPSHOT` for a page of ``limit`` entries after the
    cursor (``candidate_epoch``: :func:`schemas.keys.new_epoch`, the epoch of a history the
    read creates; ``max_bytes``: the page's bound in bytes, 0 for none)."""
    return [
        candidate_epoch,
        epoch or "",
        -1 if after is None else after,
        limit,
        NO_HISTORY_TTL_MS,
        max_bytes,
        MAX_ENTRY_BYTES,
    ]


class SnapshotUnreadable(ValueError):
    """The project's keys hold values the publish script cannot have written (another writer):
    ``which`` is ``"meta"`` or ``"stream"``, ``kind`` the foreign value's kind (to count it),
    ``problem`` says what is wrong. Also raised, with ``which`` and ``kind`` None, for a reply
    :data:`schemas.lua.SNAPSHOT` cannot have given (a server or proxy that is not Redis, or
    broken)."""

    def __init__(self, which: str | None, problem: str, kind: ForeignKind | None = None) -> None:
        super().__init__(problem if which is None else f"{which} {problem}")
        self.which = which
        self.kind = kind
        self.problem = problem


#: Problems the SNAPSHOT script reports: the key, what is wrong, the kind of foreign value.
_SCRIPT_PROBLEMS = {
    b"meta_wrong_type": ("meta", "is not a hash", ForeignKind.META),
    b"meta_bad_epoch": ("meta", "has an invalid epoch", ForeignKind.META),
    b"meta_bad_seq": ("meta", "has an invalid seq", ForeignKind.META),
    b"stream_wrong_type": ("stream", "is not a stream", ForeignKind.STREAM_KEY),
}


def _tag(raw: bytes) -> str | None:
    """A tag as the script computed it (``redis.sha1hex``); anything else is no tag."""
    tag = raw.decode("ascii", "replace")
    return tag if is_tag(tag) else None


def parse_snapshot_reply(
    project_id: int, reply: object, checked: CheckedFrames | None = None
) -> tuple[Snapshot, list[tuple[int | None, ForeignValue]]]:
    """The :class:`Snapshot` of a :data:`schemas.lua.SNAPSHOT` reply, and the foreign stream
    entries it skipped (``(seq or None, ForeignValue)``, for the caller to report; the first
    one at or below the top is the snapshot's ``corrupt_at``). Raises
    :class:`SnapshotUnreadable`.

    ``checked``: frames of the project the caller already checked
    (:class:`schemas.stored.CheckedFrames`); used only when the reply is of their epoch: an
    entry of the same bytes at a seq they hold is not checked again."""
    if not (
        isinstance(reply, list)
        and len(reply) in (5, 7)
        and isinstance(reply[3], list)
        and isinstance(reply[4], bytes)
        and all(isinstance(tag, bytes) for tag in reply[5:])
    ):
        raise SnapshotUnreadable(None, f"unexpected snapshot reply: {str(reply)[:80]}")
    raw_epoch, top, created, raw_entries, problem = reply[:5]
    if problem:
        which, text, kind = _SCRIPT_PROBLEMS.get(
            problem, ("meta", problem.decode("ascii", "replace"), ForeignKind.META)
        )
        raise SnapshotUnreadable(which, text, kind)
    try:
        meta = parse_meta(raw_epoch, str(top).encode())
    except ForeignValue as exc:
        raise SnapshotUnreadable(None, f"unexpected snapshot reply: {exc}") from None
    if meta is None:  # no epoch: the script creates the history when there is none
        raise SnapshotUnreadable(None, "unexpected snapshot reply: no epoch")
    if checked is not None and checked.epoch != meta.epoch:
        checked = None  # another history than the one they were checked in
    good, bad = parse_stream_entries(raw_entries, project_id, checked)
    corrupt_at = None
    for seq, _ in bad:
        if seq is not None and seq <= meta.seq and (corrupt_at is None or seq < corrupt_at):
            corrupt_at = seq
    entries = [
        (seq, frame)
        for seq, frame in good
        if seq <= meta.seq and (corrupt_at is None or seq < corrupt_at)
    ]
    # (Looked for only when entries were left out: a second pass over every read otherwise.)
    ahead = [seq for seq, _ in good if seq > meta.seq] if len(entries) < len(good) else ()
    if ahead:  # written by hand beyond the top: never an event of this history (yet)
        problem_text = f"entry {ahead[0]} is beyond the top {meta.seq}"
        bad = [*bad, (ahead[0], ForeignValue(ForeignKind.STREAM_ENTRY, problem_text))]
    tags = reply[5:] or (b"", b"")  # no tags: nothing to compare (a stand-in Redis's reply)
    snapshot = Snapshot(
        meta.epoch,
        meta.seq,
        entries,
        bool(created),
        corrupt_at,
        len(raw_entries),
        top_tag=_tag(tags[0]),
        after_tag=_tag(tags[1]),
    )
    return snapshot, bad
