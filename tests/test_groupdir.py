"""A ``--workers`` group's shared directory: made locked, held by its members, removed by the
next supervisor once nobody holds it (gateway.groupdir), without processes: flock locks belong to
open files, so two opens in one process contend as two processes would."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from gateway import groupdir


def test_a_group_directory_is_removed_only_once_nobody_holds_it(tmp_path: Path) -> None:
    directory, supervisor = groupdir.create(str(tmp_path))
    assert Path(directory).name.startswith(groupdir.PREFIX)
    assert [p.name for p in tmp_path.iterdir()] == [Path(directory).name]  # no staging left
    worker = groupdir.hold(directory)
    assert groupdir.sweep_abandoned(str(tmp_path)) == []
    supervisor.close()  # killed: the kernel drops its lock; a draining worker still holds one
    assert groupdir.sweep_abandoned(str(tmp_path)) == []
    assert Path(directory).is_dir()
    worker.close()
    assert groupdir.sweep_abandoned(str(tmp_path)) == [directory]
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_leaves_what_it_cannot_know_to_be_abandoned(tmp_path: Path) -> None:
    older = tmp_path / f"{groupdir.PREFIX}older-version"  # no lock file: made before locks
    older.mkdir()
    (older / "counter_worker0.db").write_bytes(b"x")
    unrelated = tmp_path / "eventbus-gateway-1234-x"
    unrelated.mkdir()
    (unrelated / groupdir.LOCK_NAME).write_bytes(b"")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / groupdir.LOCK_NAME).write_bytes(b"")
    (tmp_path / f"{groupdir.PREFIX}link").symlink_to(target)  # planted in a shared /tmp
    (tmp_path / f"{groupdir.PREFIX}file").write_bytes(b"")
    assert groupdir.sweep_abandoned(str(tmp_path)) == []
    assert older.is_dir() and unrelated.is_dir() and (target / groupdir.LOCK_NAME).exists()


def test_a_staging_directory_is_left_while_it_may_be_being_made(tmp_path: Path) -> None:
    staging = tmp_path / f"{groupdir.STAGING_PREFIX}abc"
    staging.mkdir()
    (staging / groupdir.LOCK_NAME).write_bytes(b"")  # its maker died before locking it...
    assert groupdir.sweep_abandoned(str(tmp_path)) == []  # ...or is about to lock it
    later = time.time() + groupdir.STAGING_AGE + 1
    assert groupdir.sweep_abandoned(str(tmp_path), now=later) == [str(staging)]


def test_a_missing_temporary_directory_sweeps_nothing(tmp_path: Path) -> None:
    assert groupdir.sweep_abandoned(str(tmp_path / "absent")) == []


def test_an_empty_staging_directory_whose_creator_died_is_swept(tmp_path: Path) -> None:
    """A creator killed between making its staging directory and making the lock file in it
    (``create``: mkdtemp, then ``hold``) leaves an empty directory, which was never swept: with
    no lock file to take, the sweep left it as it leaves an older version's directories, one
    more per such death, for good. Past STAGING_AGE it is removed, only while empty."""
    staging = tmp_path / f"{groupdir.STAGING_PREFIX}died"
    staging.mkdir()
    assert groupdir.sweep_abandoned(str(tmp_path)) == []  # it may be being made
    later = time.time() + groupdir.STAGING_AGE + 1
    assert groupdir.sweep_abandoned(str(tmp_path), now=later) == [str(staging)]
    assert list(tmp_path.iterdir()) == []


def test_an_old_staging_directory_its_creator_holds_or_fills_is_kept(tmp_path: Path) -> None:
    """However old, a staging directory is never removed while its creator holds its lock, nor
    one with anything in it but an unheld lock file."""
    held = tmp_path / f"{groupdir.STAGING_PREFIX}held"
    held.mkdir()
    lock = groupdir.hold(str(held))  # a creator stalled (SIGSTOP) between lock and rename
    filled = tmp_path / f"{groupdir.STAGING_PREFIX}filled"
    filled.mkdir()
    (filled / "something").write_bytes(b"")  # not ours to judge: no lock file
    later = time.time() + groupdir.STAGING_AGE + 1
    try:
        assert groupdir.sweep_abandoned(str(tmp_path), now=later) == []
        assert (held / groupdir.LOCK_NAME).exists() and (filled / "something").exists()
    finally:
        lock.close()


def test_a_creator_whose_empty_staging_directory_was_swept_makes_another(
    tmp_path: Path, monkeypatch
) -> None:
    """A creator stalled past STAGING_AGE before making its lock file finds its directory gone
    (swept while empty): it makes a new one instead of failing the start."""
    real_hold = groupdir.hold
    swept = []

    def stalled_hold(directory: str) -> groupdir.Hold:
        if not swept:  # the first staging directory is swept before the lock file is made
            swept.append(directory)
            later = time.time() + groupdir.STAGING_AGE + 1
            os.utime(directory, (0, 0))
            assert groupdir.sweep_abandoned(str(tmp_path), now=later) == [directory]
        return real_hold(directory)

    monkeypatch.setattr(groupdir, "hold", stalled_hold)
    directory, lock = groupdir.create(str(tmp_path))
    try:
        assert swept and [p.name for p in tmp_path.iterdir()] == [Path(directory).name]
    finally:
        lock.close()


def test_systemd_tmpfiles_skips_a_group_directory_while_a_member_holds_it(tmp_path: Path) -> None:
    """systemd-tmpfiles ages /tmp (10 days on Fedora, RHEL, Arch) and takes
    ``flock(LOCK_EX|LOCK_NB)`` on each directory before cleaning it, skipping one it cannot
    lock. The members locked only the lock file inside: the group's directory was aged like
    any other. On a tmpfs the metrics files' times do not move with their memory-mapped
    writes, and the lock files are never read, so after 10 days a running group lost its lock
    files (one process per slot, the sweep's marker) and every file no scrape or probe had
    read. Every member also holds a shared lock on the directory itself now."""
    directory, supervisor = groupdir.create(str(tmp_path))
    worker = groupdir.hold(directory)

    def tmpfiles_may_clean() -> bool:  # what systemd-tmpfiles' dir_cleanup asks first
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    try:
        assert not tmpfiles_may_clean()
        supervisor.close()
        assert not tmpfiles_may_clean()  # a worker still holds it
    finally:
        supervisor.close()  # (twice is fine)
        worker.close()
    assert tmpfiles_may_clean()
    assert groupdir.sweep_abandoned(str(tmp_path)) == [directory]
