"""Supervision of one job: spawn, pipe pumps, the stop sequence, the end.

Theory of operation
-------------------

Each job is one task (``Job.run``) in the manager's job nursery. It spawns the
process in a worker thread (own session, stdin /dev/null, stdout and stderr on
two pipes, plus a pidfd), writes the record, and then owns a nursery of its
own holding

* the pump, one task for both pipes: read at most MAX_RECORD bytes from each
  pipe with data, append to the output log, wait for room in the log's
  bounded queue, read again; with neither ready, wait on one descriptor (the
  pipe, or an epoll instance of the job's holding both);
* the log's writer task, started on demand while output is queued;
* the stop sequence ("ladder"), started by a stop request or when the main
  process exits and left processes behind.

The task itself waits for the main process's pidfd to become readable, then
reaps it with ``waitpid`` on its pid: no SIGCHLD handler, no ``waitpid(-1)``.
Then leftovers in the job's group get the ladder, like systemd's control-group
kill mode. Once every process of the job is gone the job is *settled*: the
pump is woken (``notify_closing``), reads what is still buffered without
blocking, and closes the pipes. So output ends at EOF, or right after the
cleanup when a stray process outside the job still holds a pipe: it never
hangs, and nothing in a pipe is lost. Then the log is flushed and closed, the
final state set, the record written and ``done`` set (``finished`` either
way: a final record a full disk refused is written by the manager's retries,
which set ``done``; until then clients see the job running).

The record is written before anything is acknowledged: a start whose first
record cannot be committed is refused, its process killed before it was ever
supervised. Where jobd has no cgroup of its own (``Context.gate``), the spawn
helper runs the command only once that record is committed (_tracking.py).

The ladder (``_ladder.py``, :class:`StopLadder`) is SIGINT, grace, SIGTERM,
grace, SIGKILL to the job's group, waiting without polling until every
process is gone. A later stop joins the running ladder; a shorter grace (0:
SIGKILL now) hurries it. It is a room of its own: it only signals and waits,
and the job (this module) reaps, drains and records.

A job with limits or isolation (``limits``) first gets its cgroup (made and
limited in a worker thread) and is spawned through the spawn helper
(``_spawn.py``), which joins the cgroup and namespaces before it execs the
command. For such a job "every process is gone" also means its cgroup is
empty (``JobCgroup.wait_empty``), the ladder's SIGKILL step kills the whole
cgroup (``setsid`` escapees included), and after the end its usage is read
(peak memory, CPU time, OOM kills) and the cgroup removed.

The job nursery is shielded (see ``_manager._host_jobs``): cancelling the
daemon does not interrupt a supervision. Shutdown asks every job to stop and,
should that take longer than the ladder can, cancels the job's own nursery
(``abort``); the job then SIGKILLs its group and records it stopped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from protocol import JobState, JobStatus, Limits, Terminal

from ._cgroups import Hierarchy, JobCgroup, OwnerGroups, Usage, join_thread, write_file
from ._db import JobDB
from ._ladder import StopLadder, kill_cgroup
from ._outputlog import MAX_RECORD, Budget, OutputLog
from ._procs import (
    NO_INPUT,
    ProcScanner,
    SetupError,
    Spawned,
    Stdio,
    group_may_exist,
    set_window_size,
    signal_group,
    spawn,
    spawn_contained,
)
from ._store import Record
from ._tracking import Leaf
from ._types import EngineConfig, EngineError

log = logging.getLogger("jobd.engine")

#: Reads of what is left in a pipe once the job's processes are gone (up to 256 KiB
#: each: more than the largest pipe buffer a job can ask for without privileges).
DRAIN_READS = 32
#: A pipe's size as the kernel makes it.
PIPE_SIZE = 64 * 1024
#: Pipe size for a job that fills its pipe (Linux lets anyone go up to 1 MiB).
BUSY_PIPE_SIZE = 1024 * 1024
#: Output logs writing at once (each in a worker thread); more busy jobs take turns.
WRITER_THREADS = 16
#: Upper bound on writing a record at the end of a job that shutdown had to abort.
PERSIST_TIMEOUT = 10.0
#: Seconds between attempts to write the ends that a full disk kept from being written.
RETRY_INTERVAL = 1.0


@dataclass(eq=False)
class Context:
    """What every job shares with the manager (one object, not one per job)."""

    config: EngineConfig
    store: JobDB
    scanner: ProcScanner
    boot_id: str
    #: The cgroup layout (None: none usable; ``cgroup_reason`` says why).
    cgroups: Hierarchy | None = None
    cgroup_reason: str = ""
    #: Why jobs cannot get namespaces, or None if they can.
    isolation_reason: str | None = None
    #: jobd's own leaf cgroup, where every process it spawns is born (_tracking).
    leaf: Leaf | None = None
    #: Every job starts through the spawn helper's gate (no leaf to find them in).
    gate: bool = False
    #: Why there is no leaf.
    tracking_reason: str = ""
    jobs: dict[int, Job] = field(default_factory=dict)
    closing: bool = False
    #: Records whose last write failed (full disk), by job ID: written again later.
    unsaved: dict[int, Record] = field(default_factory=dict)
    #: Set when a record joins ``unsaved``: wakes the manager's retry task.
    unsaved_added: trio.Event = field(default_factory=trio.Event)
    #: Serialises retries of ``unsaved`` with each other and with deletes.
    retry_lock: trio.Lock = field(default_factory=trio.Lock)
    #: The worker threads output logs write with: their own, so that busy jobs
    #: never make a spawn or a record write wait for a thread.
    writers: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(WRITER_THREADS))
    #: Each owner's log space left under ``max_log_space_per_user`` (made at its first start).
    budgets: dict[str, Budget] = field(default_factory=dict)
    #: Jobs being deleted (a second delete of one is "not found").
    deleting: set[int] = field(default_factory=set)

    def emit(self, kind: str, status: JobStatus) -> None:
        if self.config.on_event is None:
            return
        try:
            self.config.on_event(kind, status)
        except Exception:
            log.exception("on_event(%r) failed for job %d", kind, status.id)

    async def persist(self, record: Record) -> bool:
        """Write the record; True once it is committed (durable).

        A failure (a full disk) is logged and the record kept in ``unsaved``: the
        manager's retry task writes it again every RETRY_INTERVAL until it is
        committed, and so do a later successful write, a delete and the shutdown.
        A job whose final record is committed leaves memory (``jobs``): its status
        is read from the database from then on.
        """
        job_id = record.status.id
        try:
            await self.store.write(record)
        except OSError as exc:
            self.keep_unsaved(record, exc)
            return False
        self.unsaved.pop(job_id, None)
        if record.status.state is not JobState.RUNNING:
            self.jobs.pop(job_id, None)
        if self.unsaved:
            await self.retry_unsaved()
        return True

    def keep_unsaved(self, record: Record, reason: object) -> None:
        job_id = record.status.id
        if job_id not in self.unsaved:
            log.warning("cannot write the record of job %d: %s (jobd writes it again every "
                        "%g s: its end is shown once it is written)", job_id, reason,
                        RETRY_INTERVAL)
        self.unsaved[job_id] = record
        self.unsaved_added.set()

    async def retry_unsaved(self) -> None:
        """Write the final records that could not be written before.

        Only final records are ever kept (a start whose record cannot be written
        is refused), and nothing but a retry writes an ended job's record again,
        so no retry can overwrite a newer record. A job whose end is written now
        is shown ended from now on (``done``).
        """
        async with self.retry_lock:
            written = 0
            for record in list(self.unsaved.values()):
                try:
                    await self.store.write(record)
                except OSError:
                    break
                written += 1
                job_id = record.status.id
                if self.unsaved.get(job_id) is record:
                    del self.unsaved[job_id]
                    job = self.jobs.pop(job_id, None)
                    if job is not None and not job.done.is_set():
                        self.emit("ended", record.status)
                        job.done.set()
            if written:
                log.info("wrote %d job records that could not be written before", written)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


#: The most of a command or directory name an error text quotes: the status
#: keeps the error, and every status must stay small (``list`` pages, frames).
ERROR_NAME_CHARS = 256
#: The longest error text a job's status keeps.
MAX_ERROR_TEXT = 512


def _short(name: bytes) -> str:
    text = os.fsdecode(name)
    return text if len(text) <= ERROR_NAME_CHARS else text[:ERROR_NAME_CHARS - 3] + "..."


def spawn_error(exc: OSError, argv0: bytes, cwd: bytes | None) -> str:
    """The words an operator wants when a command cannot be started, at most
    MAX_ERROR_TEXT characters (names quoted are cut to ERROR_NAME_CHARS)."""
    text = _spawn_error(exc, argv0, cwd)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT - 3] + "..."


def _spawn_error(exc: OSError, argv0: bytes, cwd: bytes | None) -> str:
    name = _short(argv0)
    reason = exc.strerror or str(exc)
    if isinstance(exc, SetupError):
        return f"cannot start {name}: {exc.stage}: {reason}"
    if cwd is not None and exc.filename is not None and os.fsencode(exc.filename) == cwd \
            and os.fsencode(exc.filename) != argv0:
        return f"cannot change to directory {_short(cwd)}: {reason}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"command not found: {name}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {name}"
    if exc.errno == errno.ENOEXEC:
        return f"not executable: {name} (exec format error)"
    return f"cannot start {name}: {reason}"


class Job:
    """One job: its state, its output log, and (while running) its supervision.

    The stop sequence is a room of its own (``_ladder.py``), and so are the log's
    writer and readers (``_outputlog.py``, ``_logreader.py``). What stays here is
    one job's supervision: spawn, the pumps, reaping and the end. They share the
    job's state and its nursery and hand over in one order (the pumps drain only
    once every process is gone, the end is recorded only after they close):
    split further, each part would reach into the others' state.
    """

    __slots__ = (
        "_cgroup", "_ctx", "_final", "_input_lock", "_ladder", "_nursery", "_pending_grace",
        "_pump_fd", "_reaped", "_settled", "_stdin_fd", "_usage",
        "argv", "created", "done", "ended", "error", "exit_code", "finished", "id", "labels",
        "limits", "log", "oom", "owner", "pid", "proc_start", "signal", "spec", "started",
        "state", "stdin", "stop_requested", "tty",
    )

    def __init__(self, ctx: Context, job_id: int, owner: str, argv: tuple[bytes, ...],
                 log: OutputLog, limits: Limits | None = None, *, stdin: bool = False,
                 tty: Terminal | None = None, labels: tuple[tuple[str, str], ...] = (),
                 spec: dict[str, Any] | None = None) -> None:
        self._ctx = ctx
        self.stdin = stdin or tty is not None  # its input is ours to write (attach)
        self.tty = tty  # its terminal, as it started (None: pipes)
        self._stdin_fd = -1  # the write end of its stdin while open (a terminal: the master)
        self._input_lock: trio.StrictFIFOLock | None = None  # made by the first input
        self.id = job_id
        self.owner = owner
        self.argv = argv
        self.log = log
        if tty is not None:
            log.terminal_size = (tty.rows, tty.cols)  # a resize to it records nothing
        self.limits = limits  # as applied (server defaults included); None: none
        self.labels = labels
        self.spec = spec  # opaque: how it was asked for (Record.spec)
        self.oom = False
        self._cgroup: JobCgroup | None = None  # while it exists
        self._usage: Usage | None = None  # read when the cgroup is released
        self.created = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.pid: int | None = None
        self.proc_start: int | None = None
        self.state = JobState.RUNNING
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.error: str | None = None
        self.stop_requested = False
        #: The end is committed: shown to clients from now on.
        self.done = trio.Event()
        #: The job's task is over (every process gone; its end maybe not yet written).
        self.finished = trio.Event()
        self._final: JobStatus | None = None
        # Set once the main process is reaped; made when first needed (issue 26: most
        # jobs end without a stop sequence).
        self._reaped: trio.Event | None = None
        self._pump_fd = -1  # what the output pump waits on (a pipe, or its epoll)
        self._nursery: trio.Nursery | None = None
        self._settled = False  # every process is gone: nothing left to signal
        self._pending_grace: float | None = None
        self._ladder: StopLadder | None = None  # the stop sequence, once started

    @classmethod
    def ended_from(cls, ctx: Context, status: JobStatus, log: OutputLog,
                   spec: dict[str, Any] | None = None) -> Job:
        """A job that ended before this jobd started (loaded from its record)."""
        job = cls(ctx, status.id, status.owner, status.argv, log, status.limits,
                  stdin=status.stdin, tty=status.tty, labels=status.labels, spec=spec)
        job._final = status
        job.state = status.state
        job.done.set()
        job.finished.set()
        return job

    @property
    def running(self) -> bool:
        return self._final is None

    def status(self, *, live: bool = False) -> JobStatus:
        """The job's status; ``live``: with its cgroup's usage so far, if it runs in one
        (a few small reads from cgroupfs)."""
        if self._final is not None:
            return self._final
        usage = self._usage
        if live and usage is None and self._cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                usage = self._cgroup.usage()
        return JobStatus(
            id=self.id, owner=self.owner, argv=self.argv, state=self.state,
            exit_code=self.exit_code, signal=self.signal, error=self.error, oom=self.oom,
            pid=self.pid, created=self.created, started=self.started, ended=self.ended,
            output_bytes=self.log.output_bytes, dropped_bytes=self.log.dropped_bytes,
            limits=self.limits, peak_memory=None if usage is None else usage.peak_memory,
            cpu_time=None if usage is None else usage.cpu_time, stdin=self.stdin, tty=self.tty,
            labels=self.labels,
        )

    def shown_status(self, *, live: bool = False) -> JobStatus:
        """The status clients see: a job whose end is not yet committed is still
        running (an end a client saw is on disk; a crash before the commit makes
        the job lost)."""
        status = self.status(live=live)
        if not status.running and not self.done.is_set():
            status = replace(status, state=JobState.RUNNING, exit_code=None, signal=None,
                             error=None, oom=False, ended=None)
        return status

    def _record(self) -> Record:
        return Record(self.status(), self.proc_start, self._ctx.boot_id,
                      None if self.running else self.log.end, self.spec)

    # -- the job's task -----------------------------------------------------

    async def run(self, cwd: bytes | None, env: Mapping[bytes, bytes] | None,
                  devices: Mapping[str, str] | None = None, *,
                  task_status: trio.TaskStatus[JobStatus] = trio.TASK_STATUS_IGNORED) -> None:
        """The job's task, in the manager's (shielded) job nursery.

        A job with limits or isolation gets its cgroup (``devices``: the io limits'
        ``MAJOR:MINOR``) and is started through the spawn helper. A cgroup that
        cannot be made or limited raises EngineError to the caller: no record.
        """
        ctx = self._ctx
        # Until started() this task runs in the caller's cancel scope: a caller
        # that goes away must not leave a process nobody supervises.
        with trio.CancelScope(shield=True):
            try:
                spawned = await self._spawn(cwd, env, devices or {})
            except OSError as exc:  # the record says why it never ran
                self.state = JobState.ERROR
                self.error = spawn_error(exc, self.argv[0], cwd)
                self._finish(None)
                await self._record_start()
                task_status.started(self.status())
                ctx.emit("ended", self.status())
                self.done.set()
                self.finished.set()
                return
            self.pid = spawned.popen.pid
            self.started = time.time()
            self.proc_start = spawned.start  # read by the spawning thread
            try:
                await self._record_start()
            except EngineError:
                await self._abandon(spawned)
                raise
            if spawned.gate is not None:  # recorded: now the helper may run the command
                try:
                    await trio.to_thread.run_sync(spawned.gate, True)
                except OSError as exc:  # it could not: the record's end says why
                    await self._never_ran(spawned, spawn_error(exc, self.argv[0], cwd),
                                          task_status)
                    return
        ctx.jobs[self.id] = self
        task_status.started(self.status())
        ctx.emit("started", self.status())
        if ctx.closing:
            self.request_stop(ctx.config.stop_grace)
        returncode = await self._supervise(spawned)
        if self._cgroup is not None:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + PERSIST_TIMEOUT
                await self._release_cgroup()
        self._finish(returncode)
        saved = False
        record = self._record()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + PERSIST_TIMEOUT
            saved = await ctx.persist(record)
        if not saved:  # a full disk: shown ended once a retry has written it
            if self.id not in ctx.unsaved:  # the deadline passed: the retries take it
                ctx.keep_unsaved(record, "took too long")
        elif not self.done.is_set():
            ctx.emit("ended", self.status())
            self.done.set()
        self.finished.set()

    async def _record_start(self) -> None:
        """Commit the job's first record, or refuse the start (EngineError): a start
        is acknowledged only once its record (and so its ID) is durable."""
        try:
            await self._ctx.store.write(self._record())
        except OSError as exc:
            log.warning("job %d refused: its record cannot be written: %s", self.id, exc)
            raise EngineError(f"job not started: its record cannot be written: "
                              f"{exc.strerror or exc}") from None
        if self._ctx.unsaved:
            await self._ctx.retry_unsaved()

    async def _never_ran(self, spawned: Spawned, error: str,
                         task_status: trio.TaskStatus[JobStatus]) -> None:
        """A gated start whose command could not be executed (the helper is reaped):
        its end, state error, replaces the running record already committed."""
        for fd in (spawned.stdout, spawned.stderr, spawned.pidfd):
            os.close(fd)
        await self._release_cgroup()
        self.state = JobState.ERROR
        self.error = error
        self.pid = self.started = None
        self._finish(None)
        ctx = self._ctx
        ctx.jobs[self.id] = self
        if await ctx.persist(self._record()):
            self.done.set()
        task_status.started(self.shown_status())
        if self.done.is_set():
            ctx.emit("ended", self.status())
        self.finished.set()

    async def _abandon(self, spawned: Spawned) -> None:
        """Kill and reap a process whose job was refused (before it was supervised)."""
        # Our unreaped child pins its group ID: killpg cannot reach a stranger.
        signal_group(spawned.popen.pid, signal.SIGKILL)
        if spawned.gate is not None:  # the helper never ran the command
            spawned.gate(False)
        await kill_cgroup(self._cgroup, self.id)
        await trio.to_thread.run_sync(spawned.popen.wait)
        for fd in (spawned.stdout, spawned.stderr, spawned.pidfd):
            os.close(fd)
        await self._release_cgroup()

    async def _spawn(self, cwd: bytes | None, env: Mapping[bytes, bytes] | None,
                     devices: Mapping[str, str]) -> Spawned:
        limits = self.limits
        tty = self.tty
        stdio = Stdio(pipe=self.stdin, tty=None if tty is None else (tty.rows, tty.cols))
        if tty is not None and tty.term:
            env = {**(env if env is not None else os.environb), b"TERM": tty.term.encode()}
        gate = self._ctx.gate
        cgroups = self._ctx.cgroups
        if limits is None:
            if gate:
                spawned = await trio.to_thread.run_sync(functools.partial(
                    spawn_contained, self.argv, cwd, env, (), (), stdio, gated=True))
            elif cgroups is not None and cgroups.thread_moves_possible:
                spawned, self._cgroup = await trio.to_thread.run_sync(functools.partial(
                    spawn_measured, cgroups, self.id, self.owner, self.argv, cwd, env, stdio))
                return spawned
            else:  # v2 (whole processes move): measured in its owner's group below
                spawned = await trio.to_thread.run_sync(spawn, self.argv, cwd, env, stdio)
            if cgroups is not None:  # issue 23: measured too (a gated one before it runs)
                await self._measure(cgroups, spawned.popen.pid)
            return spawned
        if cgroups is not None:
            try:
                self._cgroup = await trio.to_thread.run_sync(functools.partial(
                    cgroups.create, self.id, limits, devices, owner=self.owner))
            except OSError as exc:
                raise EngineError(f"cannot create the job's cgroup: {exc}") from None
        join = self._cgroup.procs if self._cgroup is not None else ()
        try:
            return await trio.to_thread.run_sync(functools.partial(
                spawn_contained, self.argv, cwd, env, join, limits.isolate, stdio, gated=gate))
        except BaseException:
            await self._release_cgroup()  # the helper is reaped: it is empty
            raise

    async def _measure(self, cgroups: Hierarchy, pid: int) -> None:
        """A job without limits still gets a cgroup, only to measure it (peak
        memory, CPU time) and to find all of it when it stops. It is started
        directly (no spawn helper: its start stays fast) and, with v2, moved in
        right after exec, so a child it forks within those microseconds escapes
        the measure (with v1 it is born in it: :func:`spawn_measured`). Where
        that fails the job simply runs unmeasured."""
        def move() -> JobCgroup:
            cgroup = cgroups.create(self.id, Limits(), {}, owner=self.owner)
            try:
                for procs in cgroup.procs:
                    write_file(procs, str(pid))
            except OSError:
                with contextlib.suppress(OSError):
                    cgroup.remove()
                raise
            return cgroup

        try:
            self._cgroup = await trio.to_thread.run_sync(move)
        except (OSError, EngineError) as exc:
            log.debug("job %d: runs unmeasured (no cgroup: %s)", self.id, exc)

    async def _release_cgroup(self) -> None:
        """Read the usage, then remove the (empty) cgroup."""
        cgroup = self._cgroup
        if cgroup is None:
            return

        def release() -> Usage | None:
            usage = None
            with contextlib.suppress(OSError, ValueError):
                usage = cgroup.usage()
            try:
                cgroup.remove()
            except OSError as exc:
                log.warning("job %d: cannot remove its cgroup %s (the next start of jobd "
                            "will): %s", self.id, cgroup.name, exc)
            return usage

        self._usage = await trio.to_thread.run_sync(release)
        self._cgroup = None

    def _cgroup_populated(self) -> bool:
        if self._cgroup is None:
            return False
        try:
            return self._cgroup.populated()
        except OSError as exc:
            log.warning("job %d: cannot read its cgroup: %s", self.id, exc)
            return False

    def abort(self) -> None:
        """Stop supervising at once (shutdown ran out of time): SIGKILL, record, end."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _supervise(self, spawned: Spawned) -> int | None:
        """Until every process of the job is gone and its pipes are drained and closed.

        Returns the main process's exit status (None if aborted before it exited).
        """
        popen, pid = spawned.popen, spawned.popen.pid
        self._stdin_fd = spawned.stdin
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.log.attach(nursery)
                nursery.start_soon(self._pump, spawned.stdout, spawned.stderr)
                if self._pending_grace is not None:
                    self._start_ladder(self._pending_grace)
                await trio.lowlevel.wait_readable(spawned.pidfd)  # it exited
                returncode = popen.wait()  # reap it (waitpid on its pid: it is ours)
                self._reaped_event().set()
                if self._ladder is None and (group_may_exist(pid) or self._cgroup_populated()):
                    # Leftovers in the group: they get the stop sequence too.
                    self._start_ladder(self._ctx.config.stop_grace)
                if self._ladder is not None:
                    await self._ladder.done.wait()
                # Every process of the job is gone: pumps read what is buffered and stop.
                self._settled = True
                if self._pump_fd >= 0:
                    trio.lowlevel.notify_closing(self._pump_fd)  # wakes the pump
        finally:
            self._nursery = None
            os.close(spawned.pidfd)
            self._close_stdin()
        if nursery.cancel_scope.cancelled_caught:  # aborted by shutdown: last resort
            signal_group(pid, signal.SIGKILL)
            if self._cgroup is not None:
                with contextlib.suppress(OSError):
                    for fd in self._cgroup.kill_now():
                        os.close(fd)
            self.stop_requested = True
            return popen.poll()
        return returncode

    async def _pump(self, stdout: int, stderr: int) -> None:
        """Copy the job's pipes into the log: read each once, append, wait for room,
        read again; wait (on one file descriptor) only when none has data.

        One task for both pipes (issue 26: a task waiting costs about 3 KB, and an
        idle job is mostly what waits): with stderr a pipe of its own, the task
        waits on an epoll instance of the job's that holds both.
        """
        log_ = self.log
        streams = {stdout: 1}
        if stderr >= 0:
            streams[stderr] = 2
        poller = select.epoll(2) if len(streams) > 1 else None
        grown: set[int] = set()
        reads_after_end = 0
        try:
            if poller is not None:
                for fd in streams:
                    poller.register(fd, select.EPOLLIN)
            self._pump_fd = stdout if poller is None else poller.fileno()
            while streams:
                if self._settled:
                    # Nothing of the job is left, but a stranger (setsid) may still hold
                    # a pipe: take what is buffered, never wait for more.
                    reads_after_end += 1
                    if reads_after_end > DRAIN_READS:
                        return
                read_any = False
                for fd in list(streams):
                    await log_.wait_room()
                    try:
                        data = os.read(fd, MAX_RECORD)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EIO:  # a pty's master once no slave is open
                            raise
                        data = b""
                    if not data:  # EOF: every writer closed it (or the terminal is gone)
                        if poller is not None:
                            poller.unregister(fd)
                        del streams[fd]
                        os.close(fd)
                        continue
                    read_any = True
                    if len(data) >= PIPE_SIZE and fd not in grown:
                        # A full read: the job outpaces us. A bigger pipe lets it run
                        # ahead while the loop is busy (fewer, full records).
                        grown.add(fd)
                        with contextlib.suppress(OSError):  # over the user's pipe quota
                            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BUSY_PIPE_SIZE)
                    log_.append(streams[fd], data)
                if read_any:
                    # One read per pipe per turn: a busy job's pump never takes two
                    # turns of the loop in a row while requests (or other pumps) wait
                    # (issue 22 item 11).
                    await trio.lowlevel.checkpoint()
                    continue
                if self._settled or not streams:
                    return
                with contextlib.suppress(trio.ClosedResourceError):  # _settled now
                    await trio.lowlevel.wait_readable(self._pump_fd)
        finally:
            self._pump_fd = -1
            for fd in streams:
                os.close(fd)
            if poller is not None:
                poller.close()

    # -- input (interactive jobs) ---------------------------------------------------

    async def write_input(self, data: bytes) -> bool:
        """Write ``data`` to the job's stdin (or terminal), all of it, at the job's pace.

        Waits while the pipe (or the terminal's buffer) is full: a job that does
        not read holds up only its writers. Returns False, dropping the data,
        when the input is closed (eof, the job closed its stdin or ended).
        """
        view = memoryview(data)
        if self._input_lock is None:  # one input frame at a time, whole
            self._input_lock = trio.StrictFIFOLock()
        if not self._input_lock.locked():
            # Nobody is writing: what the pipe takes at once goes without the lock and
            # without a trip through the scheduler (bulk input: one frame is usually one
            # write into a 1 MiB pipe). Nothing awaits in between, so no other writer
            # can come between its bytes; the rest waits under the lock, which nobody
            # can take before us (it is free, and acquiring a free lock is immediate).
            try:
                while view and self._stdin_fd >= 0:
                    view = view[os.write(self._stdin_fd, view):]
            except BlockingIOError:
                pass
            except OSError:
                pass  # the loop below meets it again, and says what it was
            if not view:
                return True
        async with self._input_lock:
            while view:
                fd = self._stdin_fd
                if fd < 0:
                    return False
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(fd)
                    except trio.ClosedResourceError:  # closed while we waited
                        return False
                except OSError as exc:  # EPIPE: nobody reads; EIO: the terminal is gone
                    if exc.errno not in (errno.EPIPE, errno.EIO):
                        log.warning("job %d: cannot write its input: %s", self.id, exc)
                    self._close_stdin()
                    return False
            return True

    def close_input(self) -> None:
        """End of input: close the stdin pipe; on a terminal, type its EOF character
        (VEOF, normally Ctrl-D) as ``script`` does: a terminal stays open."""
        fd = self._stdin_fd
        if fd < 0:
            return
        if self.tty is None:
            self._close_stdin()
            return
        import termios

        with contextlib.suppress(OSError):
            eof = termios.tcgetattr(fd)[6][termios.VEOF]
            os.write(fd, eof if isinstance(eof, bytes) else bytes([eof]))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the job's terminal (its foreground group gets SIGWINCH)."""
        if self.tty is None or self._stdin_fd < 0:
            return
        try:
            set_window_size(self._stdin_fd, rows, cols)
        except OSError:
            return
        self.log.resize(rows, cols)  # recorded with the next output (asciicast replays)

    def _close_stdin(self) -> None:
        fd, self._stdin_fd = self._stdin_fd, -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)  # wakes a writer waiting on it
            os.close(fd)

    def _finish(self, returncode: int | None) -> None:
        """Set the final state; then followers may finish (the log closes)."""
        self.ended = time.time()
        if returncode is not None:
            if returncode >= 0:
                self.exit_code = returncode
            else:
                self.signal = signal_name(-returncode)
        # The OOM killer ended it: it died of SIGKILL and its cgroup counted an OOM kill.
        self.oom = (returncode == -signal.SIGKILL and self._usage is not None
                    and self._usage.oom_kills > 0)
        if self.state is not JobState.ERROR:
            if self.stop_requested or returncode is None:
                self.state = JobState.STOPPED
            elif returncode < 0:
                self.state = JobState.KILLED
            else:
                self.state = JobState.EXITED
        self.log.close()
        self._final = self.status()  # before any checkpoint: a woken follower sees it

    # -- the stop sequence ------------------------------------------------------

    def request_stop(self, grace: float) -> None:
        """Start the stop sequence, or join (and maybe hurry) the one under way."""
        self.stop_requested = True
        self._start_ladder(grace)

    def _reaped_event(self) -> trio.Event:
        if self._reaped is None:
            self._reaped = trio.Event()
        return self._reaped

    def _start_ladder(self, grace: float) -> None:
        if self._settled:
            return
        if self._ladder is not None:
            self._ladder.hurry(grace)
            return
        if self._nursery is None:  # not supervising yet
            if self._pending_grace is None or grace < self._pending_grace:
                self._pending_grace = grace
            return
        assert self.pid is not None
        self._ladder = StopLadder(self.id, self.pid, self.proc_start or 0, self._ctx.scanner,
                                  self._reaped_event(), self._cgroup, grace)
        self._nursery.start_soon(self._ladder.run)


_placement_failed = False


def spawn_for_owner(groups: OwnerGroups | None, owner: str, argv: Sequence[bytes],
                    cwd: bytes | None, env: Mapping[bytes, bytes] | None,
                    stdio: Stdio = NO_INPUT) -> Spawned:
    """Spawn a job that could not get a cgroup of its own in its owner's CPU group
    (v1, worker thread; see :class:`OwnerGroups`). Where that fails, the job runs in
    jobd's group, as before, and the failure is logged once. (With v2 a job is
    placed only by its own cgroup, inside its owner's group.)"""
    global _placement_failed
    if groups is None or not groups.per_thread:
        return spawn(argv, cwd, env, stdio)
    try:
        join_thread(f"{groups.path(owner)}/tasks")
    except OSError as exc:
        if not _placement_failed:
            _placement_failed = True
            log.warning("cannot place jobs in their owner's cgroup (they share jobd's): %s",
                        exc)
        return spawn(argv, cwd, env, stdio)
    try:
        return spawn(argv, cwd, env, stdio)
    finally:
        with contextlib.suppress(OSError):
            join_thread(f"{groups.home}/tasks")


def spawn_measured(cgroups: Hierarchy, job_id: int, owner: str, argv: Sequence[bytes],
                   cwd: bytes | None, env: Mapping[bytes, bytes] | None,
                   stdio: Stdio = NO_INPUT) -> tuple[Spawned, JobCgroup | None]:
    """Spawn a job without limits in a cgroup of its own, only to measure it (v1,
    where a thread can join a cgroup: :meth:`Hierarchy.thread_moves`; worker
    thread). The spawning thread joins the job's cgroup (inside its owner's CPU
    group), forks and returns: the job is measured from its first instruction,
    with no process moved afterwards and no other thread's turn. Where the
    cgroup cannot be made or joined, :func:`spawn_for_owner` (unmeasured)."""
    try:
        cgroup: JobCgroup | None = cgroups.create(job_id, Limits(), {}, owner=owner)
    except (OSError, EngineError) as exc:
        log.debug("job %d: runs unmeasured (no cgroup: %s)", job_id, exc)
        cgroup = None
    moves = cgroups.thread_moves(cgroup) if cgroup is not None else None
    if cgroup is None or not moves:
        return spawn_for_owner(cgroups.owner_groups(), owner, argv, cwd, env, stdio), None
    joined: list[str] = []
    try:
        try:
            for tasks, home in moves:
                join_thread(tasks)
                joined.append(home)
        except OSError as exc:
            log.debug("job %d: runs unmeasured (cannot join its cgroup: %s)", job_id, exc)
        else:
            try:
                return spawn(argv, cwd, env, stdio), cgroup
            except BaseException:
                _go_home(joined)
                joined = []
                with contextlib.suppress(OSError):  # the command never ran: it is empty
                    cgroup.remove()
                raise
    finally:
        _go_home(joined)
    with contextlib.suppress(OSError):
        cgroup.remove()
    return spawn_for_owner(cgroups.owner_groups(), owner, argv, cwd, env, stdio), None


def _go_home(homes: list[str]) -> None:
    for home in homes:
        with contextlib.suppress(OSError):
            join_thread(home)
