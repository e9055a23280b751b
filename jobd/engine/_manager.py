"""The job manager: the engine's API, start-up recovery and shutdown."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from protocol import JobState, JobStatus, Limits, Terminal

from ._cgroup_layout import detect
from ._cgroups import DAEMON_CPU_WEIGHT, OwnerGroups
from ._db import (
    JobDB,
    Page,
    fair_victims,
    finished_count,
    finished_oldest_first,
    log_space,
)
from ._job import RETRY_INTERVAL, Context, Job
from ._limits import check_enforceable, check_policy, devices, isolation_problem, resolve
from ._outputlog import MAX_RECORD, Budget, OutputLog, recover
from ._procs import ProcScanner, boot_id, lost_job_processes, scan, signal_process, wait_exit
from ._rows import log_name
from ._store import Record
from ._tracking import Leaf
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
#: Jobs removed per retention batch: one commit and one event-loop turn per batch.
PRUNE_BATCH = 1000
#: How often retention runs (and once at start): finished jobs outlive their limit
#: by at most this long.
RETENTION_INTERVAL = 60.0

#: (An alias: inside JobManager, ``list`` names its method.)
Records = list[Record]


class JobManager:
    """Runs and supervises jobs and keeps their output; see docs/engine.md.

    Made by :func:`open_job_manager`, which owns the nursery of every job.

    Why admission and bookkeeping share this class: they meet in :meth:`start`,
    where the owner's running count is checked and taken with no checkpoint in
    between (so two starts cannot both take the last place); apart, they would
    need a lock to keep that. The rest is thin: each method a few lines over the
    jobs in memory (``_job.py``) and the store (``_db.py``); start-up recovery
    and retention are this module's functions, the limits' checks ``_limits.py``.
    """

    def __init__(self, ctx: Context, nursery: trio.Nursery, next_id: int) -> None:
        self._ctx = ctx
        self._nursery = nursery
        self._next_id = next_id
        #: One retention run or prune at a time (the next sees what the last removed).
        self._pruning = trio.Lock()
        #: Running jobs (and starts in progress) per owner, for ``max_running``.
        self._running: Counter[str] = Counter()

    def _get(self, job_id: int) -> Job:
        """The job: a running one (or one whose end is not on disk yet) from memory,
        a finished one made from its record on demand."""
        if not isinstance(job_id, int) or isinstance(job_id, bool) or not 0 < job_id < 1 << 63:
            raise JobNotFound(job_id)
        ctx = self._ctx
        job = ctx.jobs.get(job_id)
        if job is not None:
            return job
        if job_id in ctx.deleting:
            raise JobNotFound(job_id)
        try:
            record = ctx.store.get(job_id)
        except sqlite3.Error as exc:
            raise EngineError(f"job database: {exc}") from None
        if record is None:
            raise JobNotFound(job_id)
        return _ended_job(ctx, record)

    async def start(self, argv: Sequence[bytes], owner: str, *, cwd: bytes | None = None,
                    env: Mapping[bytes, bytes] | None = None,
                    limits: Limits | None = None, max_running: int | None = None,
                    stdin: bool = False, tty: Terminal | None = None,
                    labels: tuple[tuple[str, str], ...] = (),
                    spec: dict[str, Any] | None = None) -> JobStatus:
        """Start a job. Returns its status once it runs (pid set) or failed to start
        (state error: "command not found: X", "permission denied: X", ...): a record is
        created either way. Malformed requests raise EngineError before any record;
        ``max_running``: LimitExceeded if ``owner`` already has that many jobs running
        (or being started). ``stdin``: the job's stdin is a pipe that
        :meth:`write_input` writes to; ``tty``: it runs on a pseudo-terminal of
        that size (``TERM`` set to its ``term``), its output all on fd 1.
        ``labels`` go into its status; ``spec`` (opaque to the
        engine) into its record, for :meth:`spec`.
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
                            writers=ctx.writers, dir_fd=ctx.store.logs_fd,
                            name=log_name(job_id), budget=self._budget(owner),
                            group=_writer_group(ctx, owner)),
                  applied, stdin=stdin, tty=tty, labels=tuple(labels), spec=spec)
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

    async def stop(self, job_id: int, grace: float | None = None) -> JobStatus:
        """SIGINT, grace, SIGTERM, grace, SIGKILL to the job's process group; returns the
        final status once every process of the job is gone. Joins a stop under way.
        """
        job = self._get(job_id)
        if job.done.is_set():
            raise InvalidState(job.status())
        if grace is None:
            grace = self._ctx.config.stop_grace
        if math.isnan(grace) or grace < 0:
            raise EngineError("the grace period must be a number of seconds, 0 or more")
        job.request_stop(grace)
        await job.finished.wait()
        if not job.done.is_set():  # its end cannot be written (a full disk): no answer yet
            raise EngineError(f"job {job_id} has ended, but its end cannot be recorded yet "
                              f"(the job database cannot be written: is the disk full?); "
                              f"jobd retries every {RETRY_INTERVAL:g} s")
        return job.status()

    def status(self, job_id: int) -> JobStatus:
        """The job's status; a running job in a cgroup with its usage so far.

        A job whose end is not yet committed is still reported running: an end a
        client saw is on disk (a crash in those milliseconds makes the job lost).
        """
        return self._get(job_id).shown_status(live=True)

    def spec(self, job_id: int) -> tuple[JobStatus, dict[str, Any] | None]:
        """The job's status and the ``spec`` its start stored (None: none kept,
        a record of a jobd before issue 23)."""
        job = self._get(job_id)
        return self.status(job_id), job.spec

    def cgroup_layout(self) -> dict[str, str]:
        """What jobd found for limits and isolation, for its start-up log line:
        ``mode`` (v2, v1 or none), ``controllers``, ``root`` or ``reason``, ``isolation``,
        ``tracking`` (cgroup with its ``leaf``, or gate with ``tracking_reason``), and
        with owner groups ``owners`` (their parent) and ``daemon_cpu`` (jobd's group)."""
        ctx = self._ctx
        out = (ctx.cgroups.describe() if ctx.cgroups is not None
               else {"mode": "none", "reason": ctx.cgroup_reason})
        groups = ctx.cgroups.owner_groups() if ctx.cgroups is not None else None
        if groups is not None:
            out["owners"] = groups.parent
            if groups.daemon is not None:
                out["daemon_cpu"] = groups.daemon
        out["isolation"] = ("pid,mount,net" if ctx.isolation_reason is None
                            else f"none ({ctx.isolation_reason})")
        if ctx.leaf is not None:
            out["tracking"], out["leaf"] = "cgroup", ctx.leaf.path
        else:
            out["tracking"], out["tracking_reason"] = "gate", ctx.tracking_reason
        return out

    def _budget(self, owner: str) -> Budget | None:
        quota = self._ctx.config.max_log_space_per_user
        if quota is None:
            return None
        budget = self._ctx.budgets.get(owner)
        if budget is None:  # the owner's first start: what its finished jobs hold now
            budget = self._ctx.budgets[owner] = Budget(quota - self._ctx.store.usage(owner))
        return budget

    def running(self) -> list[JobStatus]:
        """The jobs in memory (running, or ended with their end not yet on disk)."""
        jobs = self._ctx.jobs
        return [jobs[i].shown_status() for i in sorted(jobs)]

    async def list_page(self, after: int, limit: int, *, owner: str | None = None,
                        states: tuple[JobState, ...] = (), since: float | None = None,
                        count: bool = False, labels: tuple[tuple[str, str], ...] = ()
                        ) -> tuple[list[JobStatus], bool, int | None]:
        """Up to ``limit`` jobs with ID > ``after`` matching the filters, by ID:
        (statuses, more follow, the total that match if ``count``). Answered from
        the database's indexes in a worker thread; jobs in memory (running, or
        with their end not yet on disk) with their live status."""
        ctx = self._ctx
        names = tuple(state.value for state in states)
        try:
            page: Page = await trio.to_thread.run_sync(functools.partial(
                ctx.store.page, after, limit, owner=owner, states=names, since=since,
                count=count, labels=labels))
        except sqlite3.Error as exc:
            raise EngineError(f"job database: {exc}") from None
        found = {r.status.id: r.status for r in page.records}
        upto = page.records[-1].status.id if page.more else None
        for job_id, job in ctx.jobs.items():  # the live status; also starts not yet on disk
            if job_id > after and (upto is None or job_id <= upto):
                found[job_id] = job.shown_status()
        out = [s for i, s in sorted(found.items())
               if (owner is None or s.owner == owner) and (not states or s.state in states)
               and (since is None or s.created >= since)
               and all(label in s.labels for label in labels)]
        return out[:limit], page.more or len(out) > limit, page.total

    def list(self) -> list[JobStatus]:
        """Every job, by ID (reads the whole table in the calling thread: for tests
        and small histories; the server pages with :meth:`list_page`)."""
        out: dict[int, JobStatus] = {}
        after = 0
        while True:
            page = self._ctx.store.page(after, 10_000)
            for record in page.records:
                out[record.status.id] = record.status
            if not page.more:
                break
            after = page.records[-1].status.id
        for status in self.running():
            out[status.id] = status
        return [out[i] for i in sorted(out)]

    async def wait(self, job_id: int) -> JobStatus:
        """Wait until the job has ended; its final status."""
        job = self._get(job_id)
        await job.done.wait()
        return job.status()

    async def delete(self, job_id: int) -> None:
        """Remove an ended job's record and output."""
        job = self._get(job_id)
        if not job.done.is_set():  # running, or its end not written yet
            raise InvalidState(job.shown_status())
        ctx = self._ctx
        if job_id in ctx.deleting:
            raise JobNotFound(job_id)  # a concurrent delete won
        ctx.deleting.add(job_id)
        try:
            with trio.CancelScope(shield=True):  # bounded; half a delete helps nobody
                async with ctx.retry_lock:
                    await self._remove(job_id, job.owner, job.log.end)
                if ctx.unsaved:  # the delete may have freed the space they lacked
                    await ctx.retry_unsaved()
        finally:
            ctx.deleting.discard(job_id)

    async def _remove(self, job_id: int, owner: str, log_size: int) -> None:
        ctx = self._ctx
        try:
            await ctx.store.delete(job_id)
        except OSError as exc:
            # Refused, not acknowledged: its output log is gone (removed first, to free
            # the space), its record stays; a delete once space is back removes it.
            log.warning("job %d: cannot delete its record (its output log was removed): %s",
                        job_id, exc)
            raise EngineError(f"cannot delete job {job_id}: {exc.strerror or exc}; its "
                              f"output was removed, its record remains: delete it again "
                              f"once there is space") from None
        ctx.jobs.pop(job_id, None)
        ctx.unsaved.pop(job_id, None)
        budget = ctx.budgets.get(owner)
        if budget is not None:
            budget.left += log_size

    # -- retention ---------------------------------------------------------------

    async def prune(self, older_than: float, *, reason: str = "prune") -> int:
        """Remove the finished jobs that ended more than ``older_than`` seconds ago,
        with their logs; how many. Each removal is reported as a "pruned" event."""
        if not math.isfinite(older_than) or older_than < 0:
            raise EngineError("older_than must be a finite number of seconds, 0 or more")
        cutoff = time.time() - older_than
        return await self._prune_while(reason, lambda: functools.partial(
            finished_oldest_first, self._ctx.store, PRUNE_BATCH, ended_before=cutoff))

    async def apply_retention(self) -> int:
        """Remove what ``retain``, ``retain_count`` and ``max_log_space`` say must go;
        how many. ``retain`` removes by age alone; the two caps take from the owners
        over their share first (:func:`fair_victims`): the owner with the most
        finished jobs (or log bytes) gives its oldest, until the history fits."""
        cfg, db = self._ctx.config, self._ctx.store
        removed = 0
        if cfg.retain is not None:
            removed += await self.prune(cfg.retain, reason=f"older than --retain {cfg.retain:g}s")
        if cfg.retain_count is not None:
            keep = cfg.retain_count

            async def over_count() -> Records:
                excess = await trio.to_thread.run_sync(finished_count, db) - keep
                if excess <= 0:
                    return []
                return await trio.to_thread.run_sync(functools.partial(
                    fair_victims, db, excess, PRUNE_BATCH, by_space=False))

            removed += await self._prune_async(f"more than --retain-count {keep}", over_count)
        if cfg.max_log_space is not None:
            cap = cfg.max_log_space

            async def over_space() -> Records:
                excess = await trio.to_thread.run_sync(log_space, db) - cap
                if excess <= 0:
                    return []
                return await trio.to_thread.run_sync(functools.partial(
                    fair_victims, db, excess, PRUNE_BATCH, by_space=True))

            removed += await self._prune_async(f"logs over --max-log-space {cap}", over_space)
        return removed

    async def _prune_while(self, reason: str,
                           query: Callable[[], Callable[[], Records]]) -> int:
        async def candidates() -> Records:
            return await trio.to_thread.run_sync(query())

        return await self._prune_async(reason, candidates)

    async def _prune_async(self, reason: str,
                           candidates: Callable[[], Awaitable[Records]]) -> int:
        """Remove batches of candidates until there are none (or none removable)."""
        async with self._pruning:
            return await self._prune_locked(reason, candidates)

    async def _prune_locked(self, reason: str,
                            candidates: Callable[[], Awaitable[Records]]) -> int:
        ctx = self._ctx
        removed = 0
        while True:
            try:
                batch = [r for r in await candidates()
                         if r.status.id not in ctx.jobs and r.status.id not in ctx.deleting]
            except sqlite3.Error as exc:
                raise EngineError(f"job database: {exc}") from None
            if not batch:
                break
            ids = [r.status.id for r in batch]
            ctx.deleting.update(ids)
            try:
                with trio.CancelScope(shield=True):  # bounded; half a batch helps nobody
                    async with ctx.retry_lock:
                        await ctx.store.delete(*ids)
            except OSError as exc:
                log.warning("retention could not remove %d jobs: %s", len(ids), exc)
                break
            finally:
                ctx.deleting.difference_update(ids)
            for record in batch:
                budget = ctx.budgets.get(record.status.owner)
                if budget is not None:
                    budget.left += record.log_size or 0
                ctx.emit("pruned", record.status)
            removed += len(batch)
        if removed:
            log.info("removed %d finished jobs and their logs (%s)", removed, reason)
        return removed

    def read_output(self, job_id: int, position: int = 0, *,
                    max_chunk: int = DEFAULT_MAX_CHUNK,
                    timestamps: bool = False, resizes: bool = False) -> OutputReader:
        """The output that exists now, from ``position``. Raises JobNotFound or
        BadPosition at call time; close the iterator (``aclosing``) if you stop early.
        With ``timestamps``, one chunk per record, each with its time. With
        ``resizes``, a terminal's recorded resizes too: chunks of fd TERMINAL_FD
        (the size, ``TERMINAL_SIZE``; with its time).
        """
        job = self._get(job_id)
        _check_max_chunk(max_chunk)
        job.log.check_position(position)
        return OutputReader(job, job.log.chunks(position, max_chunk, job.log.end,
                                                timestamps=timestamps, resizes=resizes))

    def follow_output(self, job_id: int, position: int = 0, *,
                      max_chunk: int = DEFAULT_MAX_CHUNK,
                      timestamps: bool = False, resizes: bool = False) -> OutputReader:
        """Like read_output, then waits for more until the job ended and everything
        was delivered.
        """
        job = self._get(job_id)
        _check_max_chunk(max_chunk)
        job.log.check_position(position)
        return OutputReader(job, _then_done(
            job.log.chunks(position, max_chunk, None, timestamps=timestamps, resizes=resizes),
            job.done))

    # -- interactive jobs ---------------------------------------------------------

    def _interactive(self, job_id: int) -> Job | None:
        job = self._ctx.jobs.get(job_id)
        return job if job is not None and job.running and job.stdin else None

    async def write_input(self, job_id: int, data: bytes) -> bool:
        """Write to a running job's stdin (or terminal), waiting while the job does
        not read. False (the data dropped) once its input is closed or it ended."""
        job = self._interactive(job_id)
        return await job.write_input(data) if job is not None else False

    def close_input(self, job_id: int) -> None:
        """End of input: a pipe is closed; a terminal gets its EOF character."""
        job = self._interactive(job_id)
        if job is not None:
            job.close_input()

    def resize(self, job_id: int, rows: int, cols: int) -> None:
        """Resize a running terminal job's pty (SIGWINCH to its foreground group)."""
        job = self._interactive(job_id)
        if job is not None:
            job.resize(rows, cols)

    def recent_position(self, job_id: int, back: int) -> int:
        """A record boundary at most about ``back`` bytes before the log's end (the
        first record that starts within them), to replay a screen from."""
        return self._get(job_id).log.recent_position(back)

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
                await job.finished.wait()
        for job in running:
            if not job.finished.is_set():
                log.warning("job %d did not stop in time: abandoning it", job.id)
                job.abort()
        for job in running:
            await job.finished.wait()
        await self._ctx.retry_unsaved()  # space may have come back since
        if self._ctx.unsaved:
            log.warning("%d job ends could not be written (is the disk full?): the next "
                        "start reports those jobs lost", len(self._ctx.unsaved))


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
    # First of all: a state directory that is unsafe or in use by another jobd is
    # refused (StateDirError) before anything in it, or any process, is touched.
    db = await trio.to_thread.run_sync(JobDB.open, config.state_dir)
    try:
        db.start_writer(trio.lowlevel.current_trio_token())
        async with _open_with(config, db) as manager:
            yield manager
    finally:
        with trio.CancelScope(shield=True):  # commits what is queued: bounded
            await trio.to_thread.run_sync(db.close)


@asynccontextmanager
async def _open_with(config: EngineConfig, db: JobDB) -> AsyncIterator[JobManager]:
    ctx = Context(config, db, ProcScanner(), boot_id())
    records, highest = await trio.to_thread.run_sync(_load, ctx.store)
    ctx.cgroups, ctx.cgroup_reason = await trio.to_thread.run_sync(
        detect, config.cgroup_root, _instance_key(config.state_dir))
    ctx.isolation_reason = isolation_problem()
    check_policy(config.limits, ctx.cgroups, ctx.cgroup_reason)
    leaf = await _enter_leaf(ctx)  # before anything is spawned
    # jobd's CPU weight above the owners' (with v2 owner groups exist without cpu too).
    groups = (ctx.cgroups.owner_groups()
              if ctx.cgroups is not None and "cpu" in ctx.cgroups.resources else None)
    try:
        if groups is not None:
            await _enter_daemon_group(groups, leaf)
        async with _recover_and_serve(ctx, records, highest, leaf) as manager:
            yield manager
    finally:
        with trio.CancelScope(shield=True):  # bounded: a few cgroupfs writes
            if groups is not None:
                await trio.to_thread.run_sync(groups.leave_daemon)
            if leaf is not None:
                await trio.to_thread.run_sync(leaf.leave)
            if ctx.cgroups is not None:
                await trio.to_thread.run_sync(ctx.cgroups.close)


async def _enter_daemon_group(groups: OwnerGroups, leaf: Leaf | None) -> None:
    """Give jobd's own CPU group its weight above the owners' (OwnerGroups.enter_daemon);
    where it cannot, jobd competes with each owner as one task and says so once."""
    try:
        path = await trio.to_thread.run_sync(groups.enter_daemon,
                                             None if leaf is None else leaf.path)
    except OSError as exc:
        log.warning("jobd keeps the CPU weight of one owner (no cgroup of its own above "
                    "theirs): %s", exc.strerror or exc)
    else:
        log.debug("jobd's CPU group: %s (weight of %d owners)", path, DAEMON_CPU_WEIGHT)


async def _enter_leaf(ctx: Context) -> Leaf | None:
    """Choose how a restart finds every process of this jobd (_tracking.py): move
    into jobd's own leaf cgroup, or start every job through the gate."""
    mode = ctx.config.tracking
    leaf = None
    if mode != "gate":
        if ctx.cgroups is None:
            ctx.tracking_reason = ctx.cgroup_reason
        else:
            try:
                leaf = await trio.to_thread.run_sync(Leaf.enter, ctx.cgroups)
            except OSError as exc:
                ctx.tracking_reason = f"cannot move into a cgroup of its own: {exc}"
        if leaf is None and mode == "cgroup":
            raise EngineError(f"job tracking by cgroup is not possible here: "
                              f"{ctx.tracking_reason}")
    else:
        ctx.tracking_reason = "asked for"
    ctx.leaf = leaf
    ctx.gate = leaf is None
    return leaf


@asynccontextmanager
async def _recover_and_serve(ctx: Context, records: Records, highest: int,
                             leaf: Leaf | None) -> AsyncIterator[JobManager]:
    config = ctx.config
    lost = [r for r in records if r.status.state is JobState.RUNNING]
    if lost:
        await _kill_lost(ctx, lost)
    await _sweep_cgroups(ctx)
    # A previous jobd's leaf is swept whatever this jobd tracks by (the mode may change).
    sweep = leaf
    if sweep is None and ctx.cgroups is not None:
        sweep = await trio.to_thread.run_sync(Leaf.left_over, ctx.cgroups)
    if sweep is not None:
        killed = await sweep.sweep()
        if killed:
            log.warning("killed %d processes left over by a previous jobd (in cgroup %s)",
                        killed, sweep.path)
        if sweep is not leaf:
            await trio.to_thread.run_sync(sweep.leave)
    for record in records:  # all were running: lost
        status = replace(record.status, state=JobState.ERROR, error=LOST, ended=time.time())
        record = replace(record, status=status)
        await ctx.persist(record)
        if status.id in ctx.unsaved:  # else it is read from the database from now on
            ctx.jobs[status.id] = _ended_job(ctx, record)
        ctx.emit("lost", status)
    closed = trio.Event()
    async with trio.open_nursery() as root:
        jobs_nursery: trio.Nursery = await root.start(_host_jobs, closed)
        manager = JobManager(ctx, jobs_nursery, highest + 1)
        retention, retrying = trio.CancelScope(), trio.CancelScope()
        root.start_soon(_retry_unsaved, ctx, retrying)
        if (config.retain, config.retain_count, config.max_log_space) != (None, None, None):
            root.start_soon(_retain, manager, retention)
        try:
            yield manager
        finally:
            retention.cancel()
            retrying.cancel()
            # Bounded by shutdown itself: 2 x grace + SHUTDOWN_SLACK, then SIGKILL.
            with trio.CancelScope(shield=True):
                await manager.shutdown()
            closed.set()


class OutputReader:
    """A job's output chunks (an async iterator: close it with ``aclose``, e.g. by
    ``contextlib.aclosing``), and the job's status once they are read."""

    __slots__ = ("_chunks", "_job")

    def __init__(self, job: Job, chunks: AsyncGenerator[OutputChunk, None]) -> None:
        self._job = job
        self._chunks = chunks

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> OutputChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()

    def status(self) -> JobStatus:
        """The job's status now, from the job being read: still its own after the job
        was deleted or pruned meanwhile (a stream then ends with its final status,
        never ``not found``)."""
        return self._job.shown_status(live=True)


async def _then_done(chunks: AsyncGenerator[OutputChunk, None],
                     done: trio.Event) -> AsyncGenerator[OutputChunk, None]:
    """The chunks, then a wait until the job's end is committed (bounded by
    PERSIST_TIMEOUT), so that the status a stream ends with is on disk."""
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk
    await done.wait()


async def _retain(manager: JobManager, scope: trio.CancelScope) -> None:
    """Apply retention at start and then every RETENTION_INTERVAL, until cancelled."""
    with scope:
        while True:
            try:
                await manager.apply_retention()
            except EngineError as exc:
                log.warning("retention failed: %s", exc)
            await trio.sleep(RETENTION_INTERVAL)


async def _retry_unsaved(ctx: Context, scope: trio.CancelScope) -> None:
    """While records wait to be written (a full disk), try again every RETRY_INTERVAL;
    else sleep until one is kept (``Context.unsaved_added``)."""
    with scope:
        while True:
            await ctx.unsaved_added.wait()
            ctx.unsaved_added = trio.Event()
            while ctx.unsaved:
                await trio.sleep(RETRY_INTERVAL)
                await ctx.retry_unsaved()


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


def _ended_job(ctx: Context, record: Record) -> Job:
    """A job that ended, made from its record."""
    status = record.status
    log_ = OutputLog(ctx.store.log_path(status.id), ctx.config.output_cap,
                     end=record.log_size or 0, output_bytes=status.output_bytes,
                     dropped_bytes=status.dropped_bytes, closed=True,
                     dir_fd=ctx.store.logs_fd, name=log_name(status.id))
    return Job.ended_from(ctx, status, log_, record.spec)


def _load(db: JobDB) -> tuple[list[Record], int]:
    """The records still running (jobd died with them), with their logs cut after
    their last whole record, and the highest ID (blocking). Finished jobs are not
    read: restart costs what was running, whatever the history."""
    records, highest = db.load_running()
    out = []
    for record in records:
        status = record.status
        path = db.log_path(status.id)
        try:
            end, data = recover(path, db.logs_fd, log_name(status.id))
        except OSError as exc:  # a symlink (ELOOP): not followed, not trusted
            log.warning("job %d: cannot check its log %s: %s; treating it as empty",
                        status.id, path, exc.strerror)
            end, data = 0, 0
        # Its counters were never written while it ran.
        out.append(replace(record, status=replace(status, output_bytes=data), log_size=end))
    return out, highest


def _instance_key(state_dir: Path) -> str:
    """Names this jobd's cgroups apart from another instance's: its state directory."""
    return hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:12]


def _writer_group(ctx: Context, owner: str) -> Callable[[], tuple[str, str] | None] | None:
    """Where the writer thread of a job in its owner's CPU group works (v1 only: a
    thread can join a cgroup there; ``tasks`` files to join and to return to)."""
    groups = ctx.cgroups.owner_groups() if ctx.cgroups is not None else None
    if groups is None or not groups.per_thread:
        return None
    found = groups

    def tasks() -> tuple[str, str] | None:
        try:
            return f"{found.path(owner)}/tasks", f"{found.home}/tasks"
        except OSError:
            return None

    return tasks


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
