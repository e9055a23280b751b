"""The stop sequence of one job ("the ladder"): signals until every process is gone.

Theory of operation
-------------------

The ladder is SIGINT, grace, SIGTERM, grace, SIGKILL, each to the job's process
group (plus session members that left the group), SIGINT and SIGTERM followed
by SIGCONT so that stopped processes can act on them. Between steps it waits,
without polling, until every process is gone (:meth:`StopLadder.wait_gone`):
the main process reaped (the job's task reaps it and sets ``reaped``), its
cgroup empty if it has one, and no process left in the group or the session
(found in ``/proc``, waited for with ``pidfd_open``). The SIGKILL step kills
the whole cgroup (``setsid`` escapees too).

A job (``_job.py``) starts one ladder at most, in its own nursery: on a stop
request, or when the main process exited and left processes behind. A later
stop joins the running ladder; a shorter grace (0: SIGKILL now) hurries it
(:meth:`StopLadder.hurry`).

The ladder only signals and waits. It never reaps (the job's task does), and
once every process is gone it sets ``done``: what the job does then (drain
its pipes, record the end) is the job's.
"""

from __future__ import annotations

import logging
import signal

import trio

from ._cgroups import JobCgroup
from ._procs import (
    ProcInfo,
    ProcScanner,
    group_may_exist,
    job_members,
    signal_group,
    signal_process,
    wait_exit,
)

log = logging.getLogger("jobd.engine")

#: The signals, in order; a grace apart.
LADDER = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


class StopLadder:
    """The stop sequence of one running job.

    ``pid`` is the job's main process, which leads its process group;
    ``proc_start`` its start time (``/proc``: recycled PIDs are told apart);
    ``reaped`` is set by the job's task once the main process is reaped;
    ``cgroup`` is the job's cgroup, if it has one. ``done`` is set when the
    ladder ends: every process of the job is gone (or the ladder was cancelled).
    """

    __slots__ = ("_cgroup", "_job_id", "_pid", "_proc_start", "_reaped", "_scanner",
                 "_step_scope", "_strays", "done", "grace")

    def __init__(self, job_id: int, pid: int, proc_start: int, scanner: ProcScanner,
                 reaped: trio.Event, cgroup: JobCgroup | None, grace: float) -> None:
        self._job_id = job_id
        self._pid = pid
        self._proc_start = proc_start
        self._scanner = scanner
        self._reaped = reaped
        self._cgroup = cgroup
        self.grace = grace
        self.done = trio.Event()
        self._step_scope: trio.CancelScope | None = None
        self._strays = False  # a session member left the group: scan, don't trust killpg

    def hurry(self, grace: float) -> None:
        """A later stop with a shorter grace: the step under way ends sooner."""
        if grace < self.grace:
            self.grace = grace
            if self._step_scope is not None:
                self._step_scope.deadline = min(self._step_scope.deadline,
                                                trio.current_time() + grace)

    async def run(self) -> None:
        """Signal, wait a grace for every process to go, signal the next; ``done`` after."""
        try:
            step = 0
            while True:
                if self.grace <= 0:
                    step = len(LADDER) - 1
                sig = LADDER[step]
                await self._signal_all(sig)
                if sig is signal.SIGKILL:
                    await self._kill_cgroup()  # setsid escapees too
                    await self.wait_gone()
                    return
                with trio.move_on_after(self.grace) as self._step_scope:
                    await self.wait_gone()
                    return
                self._step_scope = None
                step += 1
        finally:
            self._step_scope = None
            self.done.set()

    async def _kill_cgroup(self) -> None:
        await kill_cgroup(self._cgroup, self._job_id)

    async def _members(self) -> list[ProcInfo]:
        snapshot = await self._scanner.snapshot()
        members = job_members(snapshot, self._pid, self._proc_start)
        if any(m.pgrp != self._pid for m in members):
            self._strays = True
        return members

    async def _signal_all(self, sig: int) -> None:
        pgid = self._pid
        # SIGCONT after SIGINT/SIGTERM lets a stopped process act on them (as systemd does).
        sigs = (sig,) if sig == signal.SIGKILL else (sig, signal.SIGCONT)
        sent_group = not self._reaped.is_set()
        if sent_group:  # our unreaped child pins the group ID: safe without a scan
            for s in sigs:
                signal_group(pgid, s)
        members = await self._members()
        if not sent_group and any(m.pgrp == pgid for m in members):
            for s in sigs:
                signal_group(pgid, s)
        for m in members:
            if m.pgrp != pgid:
                for s in sigs:
                    signal_process(m, s)

    async def wait_gone(self) -> None:
        """Until the main process is reaped and no other process of the job is left."""
        await self._reaped.wait()
        if self._cgroup is not None:
            try:
                await self._cgroup.wait_empty()
            except OSError as exc:  # cgroupfs misbehaving: the group checks below still hold
                log.warning("job %d: cannot watch its cgroup: %s", self._job_id, exc)
        while self._strays or group_may_exist(self._pid):
            members = await self._members()
            if not members:
                return
            await wait_exit(members[0])


async def kill_cgroup(cgroup: JobCgroup | None, job_id: int) -> None:
    """Kill every process in the job's cgroup, if it has one (an error is logged)."""
    if cgroup is None:
        return
    try:
        await cgroup.kill()
    except OSError as exc:
        log.warning("job %d: cannot kill its cgroup: %s", job_id, exc)
