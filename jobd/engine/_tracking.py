"""Finding every process jobd started, after any crash: no job outlives a restart.

Theory of operation
-------------------

A job's process is started (``fork`` + ``exec``) before its record can say
which pid it got, and the record is committed after that. A jobd killed in
between (kill -9, OOM, power) used to leave a process that no record named:
re-parented to PID 1, never stopped. jobd cannot run code in the child
between fork and exec (``preexec_fn`` is unsafe with threads; the spawn
helper costs an interpreter start), and ``PR_SET_PDEATHSIG`` follows the
forking thread, not the process. So jobd makes sure that a restart can find
every process it ever started without a record, in one of two ways, chosen
at start-up (``EngineConfig.tracking``, ``jobd --job-tracking``):

**cgroup** (where jobd can write a cgroup hierarchy: root, or a delegated v2
subtree). jobd moves itself into a leaf cgroup of its own beside the job
cgroups, ``<root>/jobd-<key>/daemon`` (v2; for v1 in one hierarchy: freezer,
else pids, ...). A child is born in its parent's cgroup, so every process
jobd spawns, and everything those fork, lives in that leaf (or in its job's
cgroup, which the spawn helper joins before the command runs) until it
moves itself, which only root can. Nothing has to be recorded first, and a
start costs nothing more. At start-up, after moving itself in, jobd SIGKILLs
every other process in the leaf, through a pidfd checked against the leaf's
list (the pidfd pins the process, so a recycled pid is never hit), in rounds
until only jobd is left; the job cgroups a previous jobd left are killed as
before. Whatever moment the previous jobd died at, its processes are in one
of those places. On a clean shutdown jobd moves back to the cgroup it came
from and removes the leaf (a ``setsid`` escapee still in it keeps it: the
next start kills it).

**gate** (the fallback where no cgroup hierarchy is writable). Every job is
started through the spawn helper (``_spawn.py``), which waits on a pipe, the
gate, before it execs the command. jobd learns the helper's pid from the
fork (the command keeps that pid: the helper execs it), commits the job's
record with that pid and its start time, and only then opens the gate. If
jobd dies before that, the gate's write end closes with it and the helper
exits without running anything; after it, the record names the process and
the restart kills it as a lost job. The price is the helper's start-up on
every start (docs/engine.md has the figure).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal

import trio

from ._cgroup_layout import own_dir
from ._cgroups import Hierarchy, read_file, write_file

log = logging.getLogger("jobd.engine")

#: Rounds of list-and-kill at start-up (a process may fork between a list and its kill).
SWEEP_ROUNDS = 10
#: How long start-up waits for the killed processes to exit.
SWEEP_TIMEOUT = 5.0


class Leaf:
    """jobd's own cgroup, where every process it spawns is born."""

    def __init__(self, path: str, previous: str | None) -> None:
        self.path = path
        self.procs = f"{path}/cgroup.procs"
        self._previous = previous

    @classmethod
    def enter(cls, cgroups: Hierarchy) -> Leaf:
        """Make the leaf and move this process into it (blocking). OSError if it cannot."""
        path, controller = cgroups.daemon_leaf()
        previous = own_dir(controller)
        parent = os.path.dirname(path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent)  # v1: made with the first job's cgroup otherwise
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        write_file(f"{path}/cgroup.procs", str(os.getpid()))
        return cls(path, previous)

    @classmethod
    def left_over(cls, cgroups: Hierarchy) -> Leaf | None:
        """The leaf of a jobd that used cgroup tracking, if one is there, without moving
        into it (a jobd that tracks by gate sweeps it all the same: blocking)."""
        path, _ = cgroups.daemon_leaf()
        return cls(path, None) if os.path.isdir(path) else None

    def others(self) -> list[int]:
        """The processes in the leaf other than this one (blocking)."""
        me = os.getpid()
        try:
            return [pid for pid in map(int, read_file(self.procs).split()) if pid != me]
        except FileNotFoundError:
            return []

    async def sweep(self) -> int:
        """SIGKILL every process in the leaf but jobd (a previous jobd's jobs and what
        they forked); returns how many, once they have exited (bounded)."""
        killed = 0
        with trio.move_on_after(SWEEP_TIMEOUT):
            for _ in range(SWEEP_ROUNDS):
                pidfds = await trio.to_thread.run_sync(self._kill_listed)
                if not pidfds:
                    break
                killed += len(pidfds)
                try:
                    for pidfd in pidfds:
                        await trio.lowlevel.wait_readable(pidfd)
                finally:
                    for pidfd in pidfds:
                        os.close(pidfd)
        return killed

    def _kill_listed(self) -> list[int]:
        opened: dict[int, int] = {}
        try:
            for pid in self.others():
                with contextlib.suppress(ProcessLookupError):
                    opened[pid] = os.pidfd_open(pid)
            # A pidfd pins its process: if the pid is still listed, the process the
            # pidfd names is the one in the leaf (or has exited: the signal goes nowhere).
            still = set(self.others())
        except BaseException:
            for pidfd in opened.values():
                os.close(pidfd)
            raise
        pidfds = []
        for pid, pidfd in opened.items():
            if pid not in still:
                os.close(pidfd)
                continue
            pidfds.append(pidfd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return pidfds

    def leave(self) -> None:
        """Move back where jobd came from and remove the leaf if it is empty (blocking)."""
        if self._previous is not None:
            try:
                write_file(f"{self._previous}/cgroup.procs", str(os.getpid()))
            except OSError as exc:
                log.warning("cannot move jobd back to cgroup %s: %s", self._previous,
                            exc.strerror or exc)
                return
        try:
            os.rmdir(self.path)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTEMPTY):
                raise
