"""Presence of one project as the consumer knows it, as a pure table (no sockets, no clock).

The gateway sends a project's whole member list (``presence``) when a subscribe asks for it, then
its coalesced changes (``presence_diff``, at most one a second): ``docs/presence.md``.
:class:`PresenceTable` holds that list (the rules of ``gateway.presence.apply_diff`` and of
eventbus.js's ``PresenceTable``): a ``presence`` replaces it, a ``presence_diff`` removes ``left``
and then puts ``joined`` and ``changed``; a diff before any ``presence`` (the table unknown) has
nothing to apply to and is dropped. Whatever it is given is checked first: a message that is not
one the gateway sends (a member without an id, an id longer than a token's ``sub`` may be, an
activity that is no item id, two members with one id in a list) is counted in
:attr:`PresenceTable.malformed` and ignored, the table as it was; one that would make the list
longer than :data:`MAX_MEMBERS` is counted so too, and the table becomes unknown (bounded memory,
never a list cut short) until a ``presence`` within the bound replaces it.

:class:`PresenceWatch` is one reader's side: it hands out :class:`PresenceView` s, immutable,
coalesced (a reader slower than the changes gets the latest list, with what changed since the
list it had before, computed by :func:`changes`), so memory stays one list per reader, however
slowly it reads.
"""

from __future__ import annotations

import msgspec

from schemas.protocol import Member, Presence, PresenceDiff

__all__ = [
    "MAX_ITEM_ID",
    "MAX_MEMBERS",
    "MAX_MEMBER_ID",
    "MAX_NAME",
    "PresenceChange",
    "PresenceTable",
    "PresenceView",
    "PresenceWatch",
    "changes",
    "is_member",
]

#: The longest member id the gateway lists (a token ``sub`` longer than this is not listed).
MAX_MEMBER_ID = 255
#: The longest ``name`` a token may carry.
MAX_NAME = 200
#: The most members a table holds. A gateway lists at most ``--presence-max-members`` (1,000 by
#: default) per pod that writes the project; one sending more (a broken or hostile one, joining
#: ever new ids in its diffs) would otherwise grow the table without bound: past this, presence
#: is unknown until a ``presence`` list within it comes.
MAX_MEMBERS = 100_000
#: The largest item id (``viewing``, ``answering``) and ``since``: exact in every client.
MAX_ITEM_ID = 2**53 - 1


class PresenceChange(msgspec.Struct, frozen=True):
    """What changed between two member lists: members who arrived (``joined``), the ids of those
    who went (``left``), and members whose name, activity or ``since`` changed (``changed``, as
    they are now). Each sorted by id."""

    joined: tuple[Member, ...] = ()
    left: tuple[str, ...] = ()
    changed: tuple[Member, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.changed)


class PresenceView(msgspec.Struct, frozen=True):
    """A project's members as one reader gets them.

    ``members``: everyone present, sorted by id; None while presence is unknown (the consumer is
    disconnected or reconnecting; the browser client reports ``null`` then). ``change``: what
    changed since the last *known* list this reader was given (everyone is in ``joined`` in the
    first one); empty in a view whose members are unknown.
    """

    project_id: int
    members: tuple[Member, ...] | None
    change: PresenceChange = PresenceChange()

    @property
    def known(self) -> bool:
        return self.members is not None

    def member(self, member_id: str) -> Member | None:
        """The member with this id, or None (also while unknown)."""
        for member in self.members or ():
            if member.id == member_id:
                return member
        return None


#: What :meth:`PresenceTable._apply` records for an id that was not listed.
_ABSENT = object()


def _item(value: object) -> bool:
    return value is None or (type(value) is int and 0 < value <= MAX_ITEM_ID)


def is_member(member: object) -> bool:
    """Whether ``member`` is one the gateway lists: a :class:`~schemas.protocol.Member` with an
    id of 1 to :data:`MAX_MEMBER_ID` characters, a name of 1 to :data:`MAX_NAME` or none,
    ``viewing``/``answering`` positive item ids or none, ``since`` a time in ms (>= 0)."""
    if type(member) is not Member:
        return False
    member_id, name, since = member.id, member.name, member.since
    return (
        type(member_id) is str
        and 0 < len(member_id) <= MAX_MEMBER_ID
        and (name is None or (type(name) is str and 0 < len(name) <= MAX_NAME))
        and _item(member.viewing)
        and _item(member.answering)
        and type(since) is int
        and 0 <= since <= MAX_ITEM_ID
    )


def _is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_MEMBER_ID


def changes(before: tuple[Member, ...] | None, after: tuple[Member, ...] | None) -> PresenceChange:
    """What changed from ``before`` to ``after`` (both sorted by id; None counts as nobody)."""
    old = {m.id: m for m in before or ()}
    new = {m.id: m for m in after or ()}
    joined = tuple(m for m in after or () if m.id not in old)
    left = tuple(m.id for m in before or () if m.id not in new)
    changed = tuple(m for m in after or () if m.id in old and old[m.id] != m)
    return PresenceChange(joined, left, changed)


class PresenceTable:
    """One project's member table, from the gateway's ``presence`` and ``presence_diff``.

    ``version`` grows with every change of :attr:`members` (a reader compares it with the one it
    saw). ``malformed`` counts the messages refused; ``ignored`` the diffs dropped because no
    ``presence`` came before them (after :meth:`forget` too: a reconnect's ``presence`` comes).
    """

    __slots__ = ("_members", "_sorted", "ignored", "malformed", "project_id", "version")

    def __init__(self, project_id: int) -> None:
        self.project_id = project_id
        self._members: dict[str, Member] | None = None
        self._sorted: tuple[Member, ...] | None = None
        self.version = 0
        self.malformed = 0
        self.ignored = 0

    @property
    def known(self) -> bool:
        return self._members is not None

    @property
    def members(self) -> tuple[Member, ...] | None:
        """Everyone present, sorted by id; None while unknown."""
        if self._sorted is None and self._members is not None:
            self._sorted = tuple(self._members[k] for k in sorted(self._members))
        return self._sorted

    def receive(self, message: object) -> bool:
        """Apply a decoded ``presence`` or ``presence_diff`` of this project; returns whether the
        members changed. Anything else, or one that fails the checks, is counted and ignored."""
        cls = type(message)
        if cls is Presence:
            return self._load(message)  # type: ignore[arg-type]
        if cls is PresenceDiff:
            return self._apply(message)  # type: ignore[arg-type]
        self.malformed += 1
        return False

    def reject(self) -> None:
        """Count a message of this project that could not even be decoded."""
        self.malformed += 1

    def forget(self) -> bool:
        """Presence is unknown now (the connection went away); returns whether it was known."""
        if self._members is None:
            return False
        self._members = None
        self._changed()
        return True

    def _changed(self) -> None:
        self._sorted = None
        self.version += 1

    def _load(self, message: Presence) -> bool:
        members = message.members
        if (
            message.project_id != self.project_id
            or type(members) is not list
            or not all(is_member(m) for m in members)
        ):
            self.malformed += 1
            return False
        if len(members) > MAX_MEMBERS:
            return self._too_many()
        table = {m.id: m for m in members}
        if len(table) != len(members):  # one id twice: which one is present?
            self.malformed += 1
            return False
        if table == self._members:
            return False  # (e.g. a resubscribe's list, the same as the diffs made it)
        self._members = table
        self._changed()
        return True

    def _apply(self, diff: PresenceDiff) -> bool:
        if (
            diff.project_id != self.project_id
            or type(diff.left) is not list
            or type(diff.joined) is not list
            or type(diff.changed) is not list
            or not all(_is_id(i) for i in diff.left)
            or not all(is_member(m) for m in diff.joined)
            or not all(is_member(m) for m in diff.changed)
        ):
            self.malformed += 1
            return False
        table = self._members
        if table is None:
            self.ignored += 1
            return False
        # What each id the diff touches was before it (_ABSENT: not listed): whether anything
        # changed is then a look at those ids alone, never a copy or compare of the whole table
        # (a flood of tiny diffs against a large table would cost its size each).
        before: dict[str, Member | object] = {}
        for member_id in diff.left:
            if member_id not in before:
                before[member_id] = table.get(member_id, _ABSENT)
            table.pop(member_id, None)
        for member in (*diff.joined, *diff.changed):
            member_id = member.id
            if member_id not in before:
                before[member_id] = table.get(member_id, _ABSENT)
            table[member_id] = member
        if len(table) > MAX_MEMBERS:
            return self._too_many()
        if all(table.get(i, _ABSENT) == was for i, was in before.items()):
            return False  # (left an absent id, put a member equal to the one listed, ...)
        self._changed()
        return True

    def _too_many(self) -> bool:
        """A list past :data:`MAX_MEMBERS`: counted as malformed, and presence is unknown (a
        list cut short would be a wrong one) until a ``presence`` within the bound comes."""
        self.malformed += 1
        return self.forget()


class PresenceWatch:
    """One reader of a :class:`PresenceTable`: :meth:`next_view` is the view to hand out now, or
    None when the reader has the latest already. Holds one list (the last known one it gave)."""

    __slots__ = ("_gave_unknown", "_known", "_version")

    def __init__(self) -> None:
        self._version = -1
        self._known: tuple[Member, ...] | None = None  # the last known list handed out
        self._gave_unknown = True  # nothing handed out yet counts as unknown

    def next_view(self, table: PresenceTable) -> PresenceView | None:
        if table.version == self._version:
            return None
        self._version = table.version
        members = table.members
        if members is None:
            if self._gave_unknown:
                return None
            self._gave_unknown = True
            return PresenceView(table.project_id, None)
        if not self._gave_unknown and members == self._known:
            return None
        change = changes(self._known, members)
        self._known = members
        self._gave_unknown = False
        return PresenceView(table.project_id, members, change)
