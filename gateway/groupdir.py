"""The directory a ``--workers`` group shares (``PROMETHEUS_MULTIPROC_DIR``): made by the
supervisor, held by every member, removed by whoever finds it abandoned.

The supervisor removes its directory when it stops. One killed with SIGKILL (the OOM killer, a
``kill -9``, a container runtime's timeout) cannot, and its workers drain and exit without it
(``PR_SET_PDEATHSIG``): the directory stayed in the temporary directory for good, ~0.5 MiB of
memory-mapped files per group (on a tmpfs, memory), one more per killed group.

So every member holds a shared ``flock`` on the directory's ``group.lock`` for its whole life
(the kernel drops it when the process ends, however it ends), and a supervisor starting a group
first removes the other groups' directories that nobody holds (:func:`sweep_abandoned`): a lock it
can take exclusively means no process of that group is left.

Every member also holds a shared ``flock`` on the directory itself (:class:`Hold`):
systemd-tmpfiles, which ages the temporary directory (10 days on Fedora, RHEL, Arch), skips a
directory it cannot lock exclusively. Without it a running group's directory was aged like any
other: on a tmpfs the metrics files' times do not move with their memory-mapped writes and the
lock files are never read, so after 10 days the group lost its lock files and every file that
no scrape or probe had read meanwhile. A directory is only ever found under
its final name with its lock already held: :func:`create` locks it under a staging name and then
renames it, so a sweep can never take a directory being made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time

from gateway.logs import get_logger

__all__ = ["LOCK_NAME", "PREFIX", "Hold", "create", "hold", "sweep_abandoned"]

log = get_logger("eventbus.workers")

#: The prefix of a group directory's name in the temporary directory.
PREFIX = "eventbus-metrics-"
#: A directory being made (:func:`create`) until it is renamed; its creator holds its lock.
STAGING_PREFIX = "eventbus-starting-"
#: The file whose shared lock every member holds.
LOCK_NAME = "group.lock"
#: A staging directory older than this is one whose creator died between making it and locking
#: it (a window of two system calls); younger ones are left alone, they may be being made. One
#: whose creator died before making its lock file is empty: it is removed only empty (``rmdir``,
#: which fails once a file is in it), so even a creator stalled that long never loses a lock
#: file it made; its ``create`` fails and is retried with a new directory.
STAGING_AGE = 3600.0


class Hold:
    """A member's hold on a group directory: shared ``flock`` locks on its ``group.lock`` (what
    :func:`sweep_abandoned` asks) and on the directory itself (what systemd-tmpfiles asks), both
    let go by :meth:`close` or by the kernel when the process ends."""

    __slots__ = ("_fds",)

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    def close(self) -> None:
        """Let go of the directory (twice is fine)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def create(parent: str | None = None) -> tuple[str, Hold]:
    """Make a group directory in ``parent`` (the temporary directory), held by the caller:
    returns its path and the :class:`Hold`, to keep for the group's life."""
    for attempt in range(3):
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
        try:
            lock = hold(staging)
            break
        except FileNotFoundError:  # swept while empty: this process stalled STAGING_AGE
            if attempt == 2:
                raise
    final = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
    try:
        os.rename(staging, final)  # (replaces the empty directory just made: one atomic step)
    except BaseException:
        lock.close()
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(final)
        raise
    return final, lock


def hold(directory: str) -> Hold:
    """Take shared locks on ``directory``'s ``group.lock`` (made if missing) and on
    ``directory`` itself: while they are held, no sweep removes the directory, and
    systemd-tmpfiles does not age it. Raises OSError."""
    fds: list[int] = []
    try:
        fds.append(
            os.open(
                os.path.join(directory, LOCK_NAME),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        )
        fcntl.flock(fds[0], fcntl.LOCK_SH)  # (only ever blocked by a sweep's short hold)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    try:
        fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        # (systemd-tmpfiles only tries, LOCK_NB: never blocks this)
        fcntl.flock(fds[1], fcntl.LOCK_SH)
    except OSError:  # a filesystem without locks on directories: the lock file is what counts
        if len(fds) > 1:
            os.close(fds.pop())
    return Hold(fds)


def sweep_abandoned(parent: str | None = None, *, now: float | None = None) -> list[str]:
    """Remove the group directories in ``parent`` that no live process holds; returns their
    paths. Only directories of this user, never a symbolic link, never one without a lock file
    (made by an older version: left as they are), never one whose lock is held. Errors (a
    directory removed meanwhile by another sweep, permissions) skip that directory."""
    parent = parent or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if name.startswith(PREFIX):
            pass
        elif not name.startswith(STAGING_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if name.startswith(STAGING_PREFIX):
            if now - info.st_mtime < STAGING_AGE:
                continue
            if _remove_if_empty(path):  # its creator died before making the lock file
                removed.append(path)
                continue
        if _remove_if_abandoned(path):
            removed.append(path)
    if removed:
        log.info("removed the metrics directories of groups that ended", directories=removed)
    return removed


def _remove_if_empty(path: str) -> bool:
    """Remove ``path`` if it is an empty directory, in one step (``rmdir`` refuses a directory
    with anything in it: a lock file its creator makes meanwhile keeps it)."""
    try:
        os.rmdir(path)
    except OSError:  # not empty, removed meanwhile, not ours
        return False
    return True


def _remove_if_abandoned(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # no lock file (an older version's), removed meanwhile, not ours
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a member of that group is alive
            return False
        shutil.rmtree(path, ignore_errors=True)  # (holding the lock: nobody joins meanwhile)
        return not os.path.lexists(path)
    finally:
        os.close(fd)
