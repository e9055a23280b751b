"""The state directory: who may write it, one jobd at a time, and no symlinks.

Opening a state directory (:func:`open_state_dir`, blocking):

1. Makes it if missing (mode 0700; missing parents get the default mode).
2. Checks every ancestor of its real path, like sshd's StrictModes: each must
   be owned by root or by jobd's user, and not writable by group or others
   unless it is sticky (``/tmp``). Otherwise someone else could swap the
   state directory for one of theirs.
3. Opens it (``O_DIRECTORY | O_NOFOLLOW``) and checks the open directory: it
   must be owned by jobd's user and not writable by group or others.
4. Takes an exclusive ``flock`` on ``lock`` inside it (``O_NOFOLLOW``, a
   regular file of jobd's user) and writes its pid there. A second jobd on the
   same directory fails here, before it touched anything else, with
   ``state directory … is in use by jobd pid N``. The lock lives as long as
   the open file: jobd's life (the descriptor is close-on-exec, so jobs never
   hold it).
5. Makes and opens the subdirectories (mode 0700, same checks).

Every file inside is then opened relative to these directory descriptors
with ``O_NOFOLLOW`` (see _store and _outputlog), so a symlink planted in the
state directory is refused (ELOOP), never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ._types import EngineError

#: Flags for opening a directory of the state directory.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The lock file's name inside the state directory.
LOCK_NAME = "lock"
#: Mode bits that let someone other than the owner change a directory's entries.
_FOREIGN_WRITE = stat.S_IWGRP | stat.S_IWOTH
#: The most of the lock file read back for the other jobd's pid.
_PID_READ = 32


class StateDirError(EngineError):
    """The state directory is unsafe to use, or another jobd uses it."""


@dataclass
class StateDir:
    """Open descriptors of a state directory and its subdirectories; holds the lock."""

    path: Path
    fd: int
    lock_fd: int
    subdirs: dict[str, int]

    def sub(self, name: str) -> int:
        return self.subdirs[name]

    def close(self) -> None:
        for fd in (*self.subdirs.values(), self.fd, self.lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.subdirs = {}


def open_state_dir(path: Path | str, subdirs: tuple[str, ...]) -> StateDir:
    """Check, lock and open the state directory (blocking); see the module docstring.

    Raises StateDirError with a one-line reason that names the fix.
    """
    path = Path(path)
    euid = os.geteuid()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    real = Path(os.path.realpath(path))
    for ancestor in real.parents:
        _check_ancestor(path, ancestor, euid)
    try:
        fd = os.open(real, DIR_FLAGS)
    except OSError as exc:
        raise StateDirError(f"cannot open state directory {path}: {exc.strerror}") from None
    try:
        _check_own(path, os.fstat(fd), euid)
        lock_fd = _lock(path, fd, euid)
    except BaseException:
        os.close(fd)
        raise
    state = StateDir(path, fd, lock_fd, {})
    try:
        for name in subdirs:
            state.subdirs[name] = _open_subdir(state, name, euid)
    except BaseException:
        state.close()
        raise
    return state


def _check_ancestor(path: Path, ancestor: Path, euid: int) -> None:
    try:
        st = os.stat(ancestor)
    except OSError as exc:
        raise StateDirError(f"cannot check {ancestor} (a parent of state directory {path}): "
                            f"{exc.strerror}") from None
    if st.st_uid not in (0, euid):
        raise StateDirError(
            f"state directory {path}: its parent {ancestor} is owned by uid {st.st_uid}, "
            f"neither root nor jobd's user (uid {euid}): run chown {euid} {ancestor}, "
            f"or choose another --state-dir")
    if st.st_mode & _FOREIGN_WRITE and not st.st_mode & stat.S_ISVTX:
        raise StateDirError(
            f"state directory {path}: its parent {ancestor} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit: "
            f"run chmod go-w {ancestor}")


def _check_own(path: Path | str, st: os.stat_result, euid: int) -> None:
    if st.st_uid != euid:
        raise StateDirError(
            f"state directory {path} is owned by uid {st.st_uid}, not by jobd's user "
            f"(uid {euid}): run chown -R {euid} {path}")
    if st.st_mode & _FOREIGN_WRITE:
        raise StateDirError(
            f"state directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): run chmod go-w {path}")


def _lock(path: Path, dir_fd: int, euid: int) -> int:
    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise StateDirError(f"cannot open the lock file of state directory {path}: "
                            f"{exc.strerror} (a symlink?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != euid:
            raise StateDirError(f"state directory {path}: {LOCK_NAME} is not a regular file "
                                f"of jobd's user: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, _PID_READ, 0).strip()
            pid = raw.decode() if raw.isdigit() else "unknown"
            raise StateDirError(f"state directory {path} is in use by jobd pid {pid}") from None
        mine = f"{os.getpid()}\n".encode()
        os.pwrite(fd, mine, 0)
        os.ftruncate(fd, len(mine))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(state: StateDir, name: str) -> int:
    """Open (not make) an existing subdirectory, checked like the others; keep it."""
    state.subdirs[name] = _open_subdir(state, name, os.geteuid(), create=False)
    return state.subdirs[name]


def _open_subdir(state: StateDir, name: str, euid: int, *, create: bool = True) -> int:
    shown = state.path / name
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=state.fd)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=state.fd)
    except OSError as exc:
        why = ("a symlink, or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR)
               else exc.strerror)
        raise StateDirError(f"state directory {state.path}: cannot open {name}/ ({why}): "
                            f"move {shown} away") from None
    try:
        _check_own(shown, os.fstat(fd), euid)
    except BaseException:
        os.close(fd)
        raise
    return fd
