"""The job manager: the engine's API, start-up recovery and shutdown."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import trio

from protocol import JobState, JobStatus, Limits

from ._cgroup_layout import detect
from ._job import Context, Job
from ._limits import check_enforceable, check_policy, devices, isolation_problem, resolve
from ._outputlog import MAX_RECORD, OutputLog, recover
from ._procs import ProcScanner, boot_id, lost_job_processes, scan, signal_process, wait_exit
from ._store import Record, Store
from ._types import (
    EngineConfig,
    EngineError,
    InvalidState,
    JobNotFound,
    LimitExceeded,
    OutputChunk,
)

log = logging.getLogger("jobd.engine")

#: The error of a job that was running when jobd died.
LOST = "lost: jobd stopped while the job ran"
#: Shutdown waits for the stop sequences (2 x grace) plus this, then SIGKILLs what is left.
SHUTDOWN_SLACK = 10.0
#: How long start-up waits for the SIGKILLed leftovers of lost jobs to die.
LOST_KILL_TIMEOUT = 5.0
#: Rounds of scan-and-kill for lost jobs (a process may fork between a scan and its kill).
LOST_KILL_ROUNDS = 5
DEFAULT_MAX_CHUNK = 512 * 1024


class JobManager:
    """Runs and supervises jobs and keeps their output; see docs/engine.md.

    Made by :func:`open_job_manager`, which owns the nursery of every job.
    """

    def __init__(self, ctx: Context, nursery: trio.Nursery, next_id: int) -> None:
        self._ctx = ctx
        self._nursery = nursery
        self._next_id = next_id
        #: Running jobs (and starts in progress) per owner, for ``max_running``.
        self._running: Counter[str] = Counter()

    def _get(self, job_id: int) -> Job:
        try:
            return self._ctx.jobs[job_id]
        except (KeyError, TypeError):
            raise JobNotFound(job_id) from None

    async def start(self, argv: Sequence[bytes], owner: str, *, cwd: bytes | None = None,
                    env: Mapping[bytes, bytes] | None = None,
                    limits: Limits | None = None, max_running: int | None = None) -> JobStatus:
        """Start a job. Returns its status once it runs (pid set) or failed to start
        (state error: "command not found: X", "permission denied: X", ...): a record is
        created either way. Malformed requests raise EngineError before any record;
        ``max_running``: LimitExceeded if ``owner`` already has that many jobs running
        (or being started).
        """
        if self._ctx.closing:
            raise EngineError("the job engine is shutting down")
        if not isinstance(owner, str):
            raise EngineError(f"owner must be a string, not {type(owner).__name__}")
        args = tuple(argv)
        if not args:
            raise EngineError("the command is empty")
        _check_bytes("command argument", *args)
        if cwd is not None:
            _check_bytes("working directory", cwd)
        if env is not None:
            _check_bytes("environment", *env.keys(), *env.values())
            if any(not k or b"=" in k for k in env):
                raise EngineError("environment variable names must be non-empty, without '='")
        ctx = self._ctx
        applied = resolve(limits, ctx.config.limits)  # LimitExceeded
        io_devices: dict[str, str] = {}
        if applied is not None:
            check_enforceable(applied, ctx.cgroups, ctx.cgroup_reason, ctx.isolation_reason)
            if applied.io_read_bps or applied.io_write_bps:
                # stat() of client-named paths: in a thread, so that a path on a hung
                # file system stalls this request only, never the event loop.
                io_devices = await trio.to_thread.run_sync(devices, applied)
        if max_running is not None and self._running[owner] >= max_running:
            raise LimitExceeded(f"too many running jobs for {owner} "
                                f"(limit {max_running} per user)")
        job_id = self._next_id
        self._next_id += 1
        job = Job(ctx, job_id, owner, args,
                  OutputLog(ctx.store.log_path(job_id), ctx.config.output_cap,
                            writers=ctx.writers), applied)
        # Shielded: a caller cancelled mid-spawn (a client gone) must not leave
        # the new job's task behind in a cancelled start; spawning is bounded.
        with trio.CancelScope(shield=True):
            # Counted from here (no await since the check above: two starts cannot
            # both take the last place) until the job's task ends.
            self._running[owner] += 1
            entered = False

            async def counted(task_status: trio.TaskStatus[JobStatus]) -> None:
                nonlocal entered
                entered = True
                try:
                    await job.run(cwd, env, io_devices, task_status=task_status)
                finally:
                    self._uncount(owner)

            try:
                status: JobStatus = await self._nursery.start(counted)
            except BaseException:
                if not entered:
                    self._uncount(owner)
                raise
        return status

    def _uncount(self, owner: str) -> None:
        self._running[owner] -= 1
        if not self._running[owner]:
            del self._running[owner]

    def running_count(self, owner: str) -> int:
        """Jobs of ``owner`` running or being started."""
        return self._running[owner]

    async def stop(self, job_id: int, grace: float | None = None) -> JobStatus:
        """SIGINT, grace, SIGTERM, grace, SIGKILL to the job's process group; returns the
        final status once every process of the job is gone. Joins a stop under way.
        """
        job = self._get(job_id)
        if not job.running:
            raise InvalidState(job.status())
        if grace is None:
            grace = self._ctx.config.stop_grace
        if math.isnan(grace) or grace < 0:
            raise EngineError("the grace period must be a number of seconds, 0 or more")
        job.request_stop(grace)
        await job.done.wait()
        return job.status()

    def status(self, job_id: int) -> JobStatus:
        """The job's status; a running job in a cgroup with its usage so far."""
        return self._get(job_id).status(live=True)

    def cgroup_layout(self) -> dict[str, str]:
        """What jobd found for limits and isolation, for its start-up log line:
        ``mode`` (v2, v1 or none), ``controllers``, ``root`` or ``reason``, ``isolation``."""
        ctx = self._ctx
        out = (ctx.cgroups.describe() if ctx.cgroups is not None
               else {"mode": "none", "reason": ctx.cgroup_reason})
        out["isolation"] = ("pid,mount,net" if ctx.isolation_reason is None
                            else f"none ({ctx.isolation_reason})")
        return out

    def list(self) -> list[JobStatus]:
        jobs = self._ctx.jobs
        return [jobs[i].status() for i in sorted(jobs)]

    async def wait(self, job_id: int) -> JobStatus:
        """Wait until the job has ended; its final status."""
        job = self._get(job_id)
        await job.done.wait()
        return job.status()

    async def delete(self, job_id: int) -> None:
        """Remove an ended job's record and output."""
        job = self._get(job_id)
        if job.running:
            raise InvalidState(job.status())
        await job.done.wait()  # its final record is written
        if self._ctx.jobs.get(job_id) is not job:
            raise JobNotFound(job_id)  # a concurrent delete won
        ctx = self._ctx
        del ctx.jobs[job_id]
        # The highest ID on disk must stay (as a tombstone) or it would come back after
        # a restart; a job that did not get its record written does not count.
        keep_id = not any(i > job_id and i not in ctx.unsaved for i in ctx.jobs)
        with trio.CancelScope(shield=True):  # bounded file operations; half a delete helps nobody
            async with ctx.retry_lock:
                ctx.unsaved.pop(job_id, None)
                try:
                    await trio.to_thread.run_sync(
                        functools.partial(ctx.store.delete, job_id, keep_id=keep_id))
                except OSError as exc:
                    log.warning("job %d deleted, but its files remain: %s", job_id, exc)
            if ctx.unsaved:  # the delete may have freed the space they lacked
                await ctx.retry_unsaved()

    def read_output(self, job_id: int, position: int = 0, *,
                    max_chunk: int = DEFAULT_MAX_CHUNK,
                    timestamps: bool = False) -> AsyncIterator[OutputChunk]:
        """The output that exists now, from ``position``. Raises JobNotFound or
        BadPosition at call time; close the iterator (``aclosing``) if you stop early.
        With ``timestamps``, one chunk per record, each with its time.
        """
        job = self._get(job_id)
        _check_max_chunk(max_chunk)
        job.log.check_position(position)
        return job.log.chunks(position, max_chunk, job.log.end, timestamps=timestamps)

    def follow_output(self, job_id: int, position: int = 0, *,
                      max_chunk: int = DEFAULT_MAX_CHUNK,
                      timestamps: bool = False) -> AsyncIterator[OutputChunk]:
        """Like read_output, then waits for more until the job ended and everything
        was delivered.
        """
        job = self._get(job_id)
        _check_max_chunk(max_chunk)
        job.log.check_position(position)
        return job.log.chunks(position, max_chunk, None, timestamps=timestamps)

    async def shutdown(self) -> None:
        """Stop every running job (in parallel, with the stop sequence); idempotent.

        Followers end as the jobs end. Should a stop sequence take longer than it
        can (a process stuck in the kernel), the job is SIGKILLed and abandoned.
        """
        self._ctx.closing = True
        grace = self._ctx.config.stop_grace
        running = [job for job in self._ctx.jobs.values() if job.running]
        for job in running:
            job.request_stop(grace)
        with trio.move_on_after(2 * grace + SHUTDOWN_SLACK):
            for job in running:
                await job.done.wait()
        for job in running:
            if not job.done.is_set():
                log.warning("job %d did not stop in time: abandoning it", job.id)
                job.abort()
        for job in running:
            await job.done.wait()
        await self._ctx.retry_unsaved()  # space may have come back since


def _check_bytes(what: str, *values: object) -> None:
    for value in values:
        if not isinstance(value, bytes):
            raise EngineError(f"{what} must be bytes, not {type(value).__name__}")
        if b"\0" in value:
            raise EngineError(f"{what} contains a NUL byte")


def _check_max_chunk(max_chunk: int) -> None:
    if max_chunk < MAX_RECORD:
        raise ValueError(f"max_chunk must be at least {MAX_RECORD} (one record)")


@asynccontextmanager
async def open_job_manager(config: EngineConfig) -> AsyncIterator[JobManager]:
    """Load the records, open the nursery that owns every job, yield the manager.

    A record still ``running`` means jobd died while the job ran: it becomes
    error "lost: jobd stopped while the job ran" and its leftover processes are
    killed, as is everything in job cgroups a previous jobd left. Finds the cgroup
    layout (an unusable ``cgroup_root`` raises OSError; defaults and caps this
    machine cannot enforce raise EngineError). On exit (normal, error or
    cancelled) runs :meth:`JobManager.shutdown`.
    """
    ctx = Context(config, Store(config.state_dir), ProcScanner(), boot_id())
    records, highest = await trio.to_thread.run_sync(_load, ctx.store)
    ctx.cgroups, ctx.cgroup_reason = await trio.to_thread.run_sync(
        detect, config.cgroup_root, _instance_key(config.state_dir))
    ctx.isolation_reason = isolation_problem()
    check_policy(config.limits, ctx.cgroups, ctx.cgroup_reason)
    lost = [r for r in records if r.status.state is JobState.RUNNING]
    if lost:
        await _kill_lost(ctx, lost)
    await _sweep_cgroups(ctx)
    for record in records:
        status = record.status
        if status.state is JobState.RUNNING:
            status = replace(status, state=JobState.ERROR, error=LOST, ended=time.time())
            record = replace(record, status=status)
            await ctx.persist(record)
            ctx.emit("lost", status)
        log_ = OutputLog(ctx.store.log_path(status.id), config.output_cap,
                         end=record.log_size or 0, output_bytes=status.output_bytes,
                         dropped_bytes=status.dropped_bytes, closed=True)
        ctx.jobs[status.id] = Job.ended_from(ctx, status, log_)
    closed = trio.Event()
    async with trio.open_nursery() as root:
        jobs_nursery: trio.Nursery = await root.start(_host_jobs, closed)
        manager = JobManager(ctx, jobs_nursery, highest + 1)
        try:
            yield manager
        finally:
            # Bounded by shutdown itself: 2 x grace + SHUTDOWN_SLACK, then SIGKILL.
            with trio.CancelScope(shield=True):
                await manager.shutdown()
                if ctx.cgroups is not None:
                    await trio.to_thread.run_sync(ctx.cgroups.close)
            closed.set()


async def _host_jobs(closed: trio.Event, *,
                     task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Own every job's task, shielded: cancelling the daemon must not cut a job's
    supervision short; shutdown stops the jobs, then ``closed`` lets this end.
    """
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await closed.wait()


def _load(store: Store) -> tuple[list[Record], int]:
    """Records, with their logs checked against a torn tail (blocking)."""
    records, highest = store.load()
    out = []
    for record in records:
        status = record.status
        path = store.log_path(status.id)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if status.state is JobState.RUNNING or record.log_size != size:
            end, data = recover(path)
            if status.state is JobState.RUNNING:  # its counters were never written
                status = replace(status, output_bytes=data)
            elif end != record.log_size:
                log.warning("job %d: log is %d bytes, its record says %s", status.id, end,
                            record.log_size)
            record = replace(record, status=status, log_size=end)
        out.append(record)
    return out, highest


def _instance_key(state_dir: Path) -> str:
    """Names this jobd's cgroups apart from another instance's: its state directory."""
    return hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:12]


async def _sweep_cgroups(ctx: Context) -> None:
    """Kill and remove the job cgroups a previous jobd left (it died with jobs running)."""
    if ctx.cgroups is None:
        return
    for cgroup in await trio.to_thread.run_sync(ctx.cgroups.leftovers):
        try:
            killed = await trio.to_thread.run_sync(cgroup.populated)
            with trio.move_on_after(LOST_KILL_TIMEOUT):
                await cgroup.kill()
            await trio.to_thread.run_sync(cgroup.remove)
        except OSError as exc:
            log.warning("cannot remove cgroup %s left over by a previous jobd: %s",
                        cgroup.name, exc)
            continue
        log.warning("removed cgroup %s left over by a previous jobd%s", cgroup.name,
                    ", after killing its processes" if killed else "")


async def _kill_lost(ctx: Context, lost: list[Record]) -> None:
    """SIGKILL what is left of jobs whose jobd died, verifying each process's identity."""
    targets = [(r.status.pid, r.proc_start) for r in lost
               if r.status.pid is not None and r.proc_start is not None
               and r.boot_id == ctx.boot_id]  # another boot: nothing of them can be alive
    if not targets:
        return
    with trio.move_on_after(LOST_KILL_TIMEOUT):
        for _ in range(LOST_KILL_ROUNDS):
            snapshot = await trio.to_thread.run_sync(scan)
            victims = [p for pid, start in targets
                       for p in lost_job_processes(snapshot, pid, start)]
            if not victims:
                return
            for p in victims:
                if signal_process(p, signal.SIGKILL):
                    log.warning("killed pid %d, left over from a job lost by a previous jobd",
                                p.pid)
            for p in victims:
                await wait_exit(p)
