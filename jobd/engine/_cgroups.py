"""Cgroups for jobs: one cgroup per job, its limits, kill, wait for empty, and usage.

Theory of operation
-------------------

The layout (which hierarchy, where) is found once at start-up by
``_cgroup_layout.detect``; it yields a :class:`Hierarchy`, the factory of job
cgroups. Jobs live under ``<root>/jobd-<key>/job-<id>``.

**A job's cgroup** is made (and its limits written) before the process
exists; the spawn helper (``_spawn.py``) writes its own pid to each
``cgroup.procs`` before it execs the command, so the command never runs
unconfined. Once the job has ended and its cgroup is empty, jobd reads the
usage (peak memory, CPU time, OOM kills) and removes the cgroup.

**Kill and wait.** v2: ``cgroup.kill`` SIGKILLs every process of the cgroup
in the kernel, forks in flight included; emptiness is the ``populated 0``
line of ``cgroup.events``, which the kernel signals with POLLPRI: an epoll
instance watches for it, and Trio waits on the epoll fd (the file itself is
always "readable", so it cannot be waited on directly). v1: freeze the
cgroup (freezer), open a pidfd for every task, SIGKILL each through its
pidfd, thaw, wait for the pidfds; repeat until ``cgroup.procs`` is empty (a
fork that raced the freeze is caught by the next round). v1 has no event
for emptiness; the pidfds of its tasks are what we wait on, never a sleep.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from protocol import Limits

from ._types import EngineError

#: The v2 controllers a job's limits need.
V2_CONTROLLERS = ("memory", "cpu", "io", "pids")
#: The v1 hierarchies jobs join: the limits' and those for kill and accounting.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "blkio", "pids", "freezer")
#: CFS period in microseconds (the kernel's default); ``--cpus`` sets the quota.
CPU_PERIOD_US = 100_000
JOB_PREFIX = "job-"
#: One cgroup per owner (CPU only, equal weight, as systemd's user slices): the
#: jobs without a cgroup of their own run in their owner's, so that one user's
#: busy jobs share the CPU with another's as two users, not as N jobs against 1,
#: and jobd itself, outside them all, keeps its turn (issue 22 item 11).
OWNER_PREFIX = "owner-"
#: jobd's own cgroup beside the jobs' (``<root>/jobd-<key>/daemon``); see _tracking.
DAEMON_LEAF = "daemon"
#: jobd's CPU weight in owners: where the owner groups exist, jobd's own group beside
#: them weighs this many of them (v1 ``cpu.shares`` 10240 against 1024, v2 ``cpu.weight``
#: 1000 against 100), so that its event loop gets the CPU soon after it wakes however
#: busy the owners' jobs are (issue 22 item 11). jobd uses little CPU of its own: the
#: weight buys it latency, and takes from the jobs only what it uses.
DAEMON_CPU_WEIGHT = 10
#: Rounds of freeze-kill-thaw before a v1 kill gives up on a cgroup that refills.
V1_KILL_ROUNDS = 100


@dataclass(frozen=True)
class Usage:
    """What a job's cgroup measured."""

    peak_memory: int | None
    cpu_time: float | None
    oom_kills: int


class JobCgroup(ABC):
    """One job's cgroup (in each v1 hierarchy, or one v2 directory)."""

    __slots__ = ()

    @property
    @abstractmethod
    def name(self) -> str:
        """``job-<id>``."""

    @property
    @abstractmethod
    def procs(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files the spawn helper writes its pid to."""

    @abstractmethod
    def populated(self) -> bool:
        """True while a process is in it (blocking, but cheap)."""

    @abstractmethod
    async def wait_empty(self) -> None:
        """Until no process is left in it."""

    @abstractmethod
    def kill_now(self) -> list[int]:
        """SIGKILL every process in it once (blocking). Returns pidfds of the processes
        signalled, if it had to signal them one by one: the caller waits and closes them."""

    @abstractmethod
    async def kill(self) -> None:
        """SIGKILL every process in it, forks included; returns once it is empty."""

    @abstractmethod
    def usage(self) -> Usage:
        """Peak memory, CPU time and OOM kills so far (blocking, cheap)."""

    @abstractmethod
    def remove(self) -> None:
        """rmdir it (blocking); it must be empty. Gone already is fine."""


class Hierarchy(ABC):
    """The cgroup layout jobd found, and the factory of job cgroups."""

    mode: str
    #: Which limits it can enforce, among memory, cpu, io, pids.
    resources: frozenset[str]
    #: A thread can join a job's cgroup alone (v1): :meth:`thread_moves`.
    thread_moves_possible = False

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """For jobd's start-up log line."""

    @abstractmethod
    def create(self, job_id: int, limits: Limits, devices: Mapping[str, str], *,
               owner: str | None = None) -> JobCgroup:
        """Make the job's cgroup and write its limits (blocking). ``devices`` maps the
        io limits' device paths to ``MAJOR:MINOR``. Raises EngineError."""

    @abstractmethod
    def leftovers(self) -> list[JobCgroup]:
        """Job cgroups that exist now (at start-up: a previous jobd's)."""

    @abstractmethod
    def daemon_leaf(self) -> tuple[str, str]:
        """(The directory of jobd's own leaf, beside the job cgroups, where every
        process jobd spawns is born; the controller naming its hierarchy in
        /proc/self/cgroup, "" for v2). See _tracking."""

    @abstractmethod
    def close(self) -> None:
        """Remove the jobs' parent directory if no job cgroup is left (blocking)."""

    def owner_groups(self) -> OwnerGroups | None:
        """The per-owner CPU groups, where this layout has the cpu controller."""
        return None

    def thread_moves(self, job: JobCgroup) -> list[tuple[str, str]] | None:
        """Where a thread can join ``job`` (v1: one thread, not its whole process):
        pairs of (the job's ``tasks`` file, the one of jobd's cgroup to return to),
        one per hierarchy, for :func:`join_thread`. None where only whole processes
        move (v2)."""
        return None


class OwnerGroups:
    """One CPU cgroup per owner under the jobs' parent, all with the default (equal)
    weight; made on first use, removed at close when empty.

    Placement happens at spawn: with cgroup v1 (``per_thread``) the spawning worker
    thread moves itself into the job's cgroup inside the owner's group (or the owner's
    group: :func:`jobd.engine._job.spawn_for_owner`), forks, and moves back, so the job
    is in its group from its first instruction. With v2, where a domain cgroup holds
    whole processes, every job's own cgroup is inside its owner's group
    (``<parent>/owner-<h>/job-<id>``): a job with limits joins it before it runs (the
    spawn helper), one without is moved there right after it started (a child it
    forked in that first moment stays in jobd's group). With v2 the groups exist
    whatever the controllers; their weight needs the cpu controller.

    jobd's own group beside them (:meth:`enter_daemon`) weighs DAEMON_CPU_WEIGHT owners.
    """

    def __init__(self, parent: str, *, per_thread: bool, home: str,
                 enable: tuple[str, ...] = ()) -> None:
        self.parent = parent
        self.per_thread = per_thread
        self.home = home  # where the spawning thread returns to (v1)
        self._enable = enable  # v2: the controllers a new group hands to its jobs
        self._made: dict[str, str] = {}  # owner -> its group, made
        self._left: str | None = None  # v1: jobd's cpu cgroup before it entered its own
        self.daemon: str | None = None  # jobd's own CPU group, once it has its weight

    def enter_daemon(self, leaf: str | None) -> str:
        """Give jobd itself a CPU group beside the owners', ``<parent>/daemon``, weighing
        DAEMON_CPU_WEIGHT owners (blocking; OSError if it cannot). ``leaf`` is jobd's
        tracking leaf, if it is in one (_tracking): with v2 that is this very group,
        and jobd must already be in it (a v2 process is in one cgroup); with v1 jobd
        moves its whole process in, and worker threads return there after working in
        an owner's group. Returns the group."""
        path = f"{self.parent}/{DAEMON_LEAF}"
        if not self.per_thread:
            if leaf != path:
                raise OSError(errno.ENOENT, "jobd is not in its own cgroup (job tracking by "
                              "gate)", path)
            write_file(f"{path}/cpu.weight", str(DAEMON_CPU_WEIGHT * 100))
            self.daemon = path
            return path
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        write_file(f"{path}/cpu.shares", str(DAEMON_CPU_WEIGHT * 1024))
        if leaf != path:
            write_file(f"{path}/cgroup.procs", str(os.getpid()))
            self._left = self.home
        self.home = self.daemon = path
        return path

    def leave_daemon(self) -> None:
        """v1: move jobd back to the cpu cgroup it came from and remove its group
        (blocking; at shutdown, so that the jobs' parent can go)."""
        left, self._left = self._left, None
        self.daemon = None
        if left is None:
            return
        with contextlib.suppress(OSError):
            write_file(f"{left}/cgroup.procs", str(os.getpid()))
            self.home = left
            _rmdir(f"{self.parent}/{DAEMON_LEAF}")

    def path(self, owner: str) -> str:
        """The owner's group, made if need be (blocking). Raises OSError. One string
        per owner: every job of the owner's refers to it."""
        path = self._made.get(owner)
        if path is None:
            name = OWNER_PREFIX + hashlib.sha256(
                owner.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            path = f"{self.parent}/{name}"
            with contextlib.suppress(FileExistsError):
                os.makedirs(path)
            for controller in self._enable:  # v2: for its jobs' cgroups (a limit that
                with contextlib.suppress(OSError):  # cannot be applied says so itself)
                    write_file(f"{path}/cgroup.subtree_control", f"+{controller}")
            self._made[owner] = path
        return path

    def remove_empty(self) -> None:
        try:
            names = [e.name for e in os.scandir(self.parent)
                     if e.name.startswith(OWNER_PREFIX) and e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name in names:
            with contextlib.suppress(OSError):  # EBUSY: a job is still in it
                _rmdir(f"{self.parent}/{name}")


# -- small file helpers (cgroupfs files are tiny and in memory) ---------------------


def read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def join_thread(tasks: str) -> None:
    """Move the calling thread into the v1 cgroup whose ``tasks`` file this is.

    It writes ``0`` (the caller), not its thread ID: for a named thread the kernel
    takes the process-wide threadgroup lock, a per-CPU rwsem whose write side
    waits for an RCU grace period when no cgroup move happened lately (measured
    6-22 ms here, on the path of every lone start), and which every fork must
    then take the slow way. For the caller itself it needs no such lock.
    """
    write_file(tasks, "0")


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(text: str, key: str) -> int | None:
    """The value of ``key value`` lines (cgroup.events, memory.events, cpu.stat, ...)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _int_file(path: str) -> int | None:
    try:
        return int(read_file(path).strip())
    except (OSError, ValueError):
        return None


def _pids(procs: str) -> list[int]:
    """The processes listed; none if the cgroup is gone (ENOENT, or ENODEV once removed)."""
    try:
        return [int(line) for line in read_file(procs).split()]
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENODEV:
            return []
        raise


def _apply(path: str, text: str, what: str) -> None:
    try:
        write_file(path, text)
    except OSError as exc:
        raise EngineError(f"cannot apply {what}: {exc.strerror or exc} "
                          f"(writing {text.strip()!r} to {path})") from None


def _rmdir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


# -- cgroup v2 ----------------------------------------------------------------------


class V2Job(JobCgroup):
    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def procs(self) -> tuple[str, ...]:
        return (f"{self.path}/cgroup.procs",)

    def populated(self) -> bool:
        try:
            return _keyed(read_file(f"{self.path}/cgroup.events"), "populated") == 1
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENODEV:
                return False  # removed: nothing can be in it
            raise

    async def wait_empty(self) -> None:
        try:
            fd = os.open(f"{self.path}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            with select.epoll() as ep:
                ep.register(fd, select.EPOLLPRI)
                # Each read re-arms the notification, so a change after it wakes us.
                while _populated(fd):
                    await trio.lowlevel.wait_readable(ep.fileno())
        finally:
            os.close(fd)

    def kill_now(self) -> list[int]:
        try:
            write_file(f"{self.path}/cgroup.kill", "1")
        except FileNotFoundError:  # Linux < 5.14, or the cgroup is gone already
            return _kill_listed(self.procs[0])
        return []

    async def kill(self) -> None:
        try:
            write_file(f"{self.path}/cgroup.kill", "1")
        except FileNotFoundError:  # Linux < 5.14 (or it is gone: nothing to do)
            await _kill_by_rounds(self)
            return
        await self.wait_empty()

    def usage(self) -> Usage:
        try:
            cpu_us = _keyed(read_file(f"{self.path}/cpu.stat"), "usage_usec")
        except OSError:
            cpu_us = None
        try:
            ooms = _keyed(read_file(f"{self.path}/memory.events"), "oom_kill") or 0
        except OSError:
            ooms = 0
        return Usage(_int_file(f"{self.path}/memory.peak"),
                     None if cpu_us is None else cpu_us / 1e6, ooms)

    def remove(self) -> None:
        _rmdir(self.path)


def _populated(events_fd: int) -> bool:
    try:
        return _keyed(os.pread(events_fd, 4096, 0).decode(), "populated") == 1
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return False  # the cgroup was removed under us: it was empty
        raise


class V2Hierarchy(Hierarchy):
    mode = "v2"

    def __init__(self, parent: str, resources: frozenset[str]) -> None:
        self.parent = parent
        self.resources = resources

    def describe(self) -> dict[str, str]:
        return {"mode": self.mode, "controllers": ",".join(sorted(self.resources)) or "none",
                "root": self.parent}

    def create(self, job_id: int, limits: Limits, devices: Mapping[str, str], *,
               owner: str | None = None) -> JobCgroup:
        # In its owner's group, so that the owner's jobs together weigh as one (issue 22
        # item 11): with v2 a process is in one cgroup, and this is the job's.
        base = self.parent if owner is None else self._owner_groups().path(owner)
        path = f"{base}/{JOB_PREFIX}{job_id}"
        os.mkdir(path)
        try:
            if limits.memory is not None:
                _apply(f"{path}/memory.max", str(limits.memory), "--memory")
                # No swap beyond the limit: --memory is what the job may use at all.
                with contextlib.suppress(FileNotFoundError):
                    write_file(f"{path}/memory.swap.max", "0")
            if limits.cpus is not None:
                quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
                _apply(f"{path}/cpu.max", f"{quota} {CPU_PERIOD_US}", "--cpus")
            if limits.pids is not None:
                _apply(f"{path}/pids.max", str(limits.pids), "--pids")
            for option, key, entries in (("--io-read-bps", "rbps", limits.io_read_bps),
                                         ("--io-write-bps", "wbps", limits.io_write_bps)):
                for device, rate in entries:
                    _apply(f"{path}/io.max", f"{devices[device]} {key}={rate}",
                           f"{option} {device}")
        except BaseException:
            _rmdir(path)
            raise
        return V2Job(path)

    def leftovers(self) -> list[JobCgroup]:
        # Job cgroups in owner groups first, then any beside them (as jobd made them
        # before owner groups), then the owner groups themselves, each once empty.
        owners = [f"{self.parent}/{name}" for name in _job_dirs(self.parent, OWNER_PREFIX)]
        nested = [f"{owner}/{name}" for owner in owners for name in _job_dirs(owner)]
        beside = [f"{self.parent}/{name}" for name in _job_dirs(self.parent)]
        return [V2Job(path) for path in nested + beside + owners]

    def owner_groups(self) -> OwnerGroups | None:
        # With v2 always: a job's cgroup is in its owner's group, whatever controllers
        # there are (the layout stays one, and its placement is testable anywhere).
        return self._owner_groups()

    def _owner_groups(self) -> OwnerGroups:
        if not hasattr(self, "_owners"):
            self._owners = OwnerGroups(self.parent, per_thread=False, home=self.parent,
                                       enable=tuple(sorted(self.resources)))
        return self._owners

    def daemon_leaf(self) -> tuple[str, str]:
        return f"{self.parent}/{DAEMON_LEAF}", ""

    def close(self) -> None:
        OwnerGroups(self.parent, per_thread=False, home=self.parent).remove_empty()
        with contextlib.suppress(OSError):  # EBUSY: a job cgroup could not be removed
            _rmdir(self.parent)


# -- cgroup v1 ----------------------------------------------------------------------


class V1Job(JobCgroup):
    """A job's cgroup in each v1 hierarchy jobd uses: ``<parent>/<name>``, or in the cpu
    hierarchy (and those co-mounted with it) ``<owner group>/<name>`` when ``owner`` is
    given. It keeps only its name and shared strings, and spells its directories out
    when asked (issue 26: every running job has one)."""

    __slots__ = ("_name", "_owner", "_parents")

    def __init__(self, name: str, parents: Mapping[str, str], owner: str | None = None) -> None:
        self._name = name
        self._parents = parents  # controller -> jobs' parent directory (shared)
        self._owner = owner  # the owner's CPU group, holding it in the cpu hierarchy

    @property
    def name(self) -> str:
        return self._name

    @property
    def dirs(self) -> dict[str, str]:
        """controller -> directory (co-mounted controllers share one)."""
        cpu = self._parents.get("cpu") if self._owner is not None else None
        return {c: f"{self._owner}/{self.name}" if cpu is not None and p == cpu
                else f"{p}/{self.name}" for c, p in self._parents.items()}

    @property
    def procs(self) -> tuple[str, ...]:
        return tuple(f"{d}/cgroup.procs" for d in dict.fromkeys(self.dirs.values()))

    @property
    def _track(self) -> str:
        """Where to list the job's processes: freezer first (it is what kill uses)."""
        dirs = self.dirs
        track = next((dirs[c] for c in ("freezer", "pids", "memory") if c in dirs),
                     next(iter(dirs.values())))
        return f"{track}/cgroup.procs"

    def populated(self) -> bool:
        return bool(_pids(self._track))

    async def wait_empty(self) -> None:
        while True:
            pids = _pids(self._track)
            if not pids:
                return
            try:
                pidfd = os.pidfd_open(pids[0])
            except ProcessLookupError:
                continue
            try:
                # The pidfd pins the process: if the pid is still listed, it is ours.
                if pids[0] in _pids(self._track):
                    await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)

    def kill_now(self) -> list[int]:
        freezer = self.dirs.get("freezer")
        if freezer is None:
            return _kill_listed(self._track)
        state = f"{freezer}/freezer.state"
        # Frozen tasks cannot fork or exit: the list is complete and every pid stays
        # theirs while we open pidfds and signal. The SIGKILLs land at the thaw.
        try:
            write_file(state, "FROZEN")
        except FileNotFoundError:
            return []  # removed: nothing left in it
        try:
            return _kill_listed(self._track)
        finally:
            with contextlib.suppress(FileNotFoundError):
                write_file(state, "THAWED")

    async def kill(self) -> None:
        await _kill_by_rounds(self)

    def usage(self) -> Usage:
        memory, cpuacct = self.dirs.get("memory"), self.dirs.get("cpuacct")
        ooms = 0
        if memory is not None:
            with contextlib.suppress(OSError):
                ooms = _keyed(read_file(f"{memory}/memory.oom_control"), "oom_kill") or 0
        cpu_ns = None if cpuacct is None else _int_file(f"{cpuacct}/cpuacct.usage")
        return Usage(None if memory is None else _int_file(f"{memory}/memory.max_usage_in_bytes"),
                     None if cpu_ns is None else cpu_ns / 1e9, ooms)

    def remove(self) -> None:
        first: OSError | None = None
        for d in dict.fromkeys(self.dirs.values()):
            try:
                _rmdir(d)
            except OSError as exc:
                first = first or exc
        if first is not None:
            raise first


class V1Hierarchy(Hierarchy):
    mode = "v1"
    thread_moves_possible = True

    def __init__(self, parents: Mapping[str, str]) -> None:
        self.parents = dict(parents)  # controller -> jobs' parent directory
        names = {"memory": "memory", "cpu": "cpu", "blkio": "io", "pids": "pids"}
        self.resources = frozenset(names[c] for c in self.parents if c in names)
        # A job without limits gets its cgroup only to be measured and found (issue
        # 23): the hierarchies that measure (memory, cpuacct), place (cpu) and find
        # or kill it (freezer, else pids) suffice. blkio, and pids beside a freezer,
        # would only cost every start a directory made, joined and removed (issue
        # 26); the hierarchy of jobd's tracking leaf stays whatever it is. Shared by
        # those jobs' V1Job (co-mounted controllers stay together).
        skip = {"blkio"} | ({"pids"} if "freezer" in self.parents else set())
        if self.parents:
            skip.discard(self.daemon_leaf()[1])
        kept = {p for c, p in self.parents.items() if c not in skip}
        self._measuring = {c: p for c, p in self.parents.items() if p in kept}

    def describe(self) -> dict[str, str]:
        root = next(iter(self.parents.values()))
        return {"mode": self.mode, "controllers": ",".join(self.parents), "root": root}

    def create(self, job_id: int, limits: Limits, devices: Mapping[str, str], *,
               owner: str | None = None) -> JobCgroup:
        name = f"{JOB_PREFIX}{job_id}"
        made: dict[str, str] = {}
        parents = self._measuring if limits == Limits() else self.parents
        groups = self.owner_groups() if owner is not None else None
        # In the cpu hierarchy (and those co-mounted with it) the job's cgroup is inside
        # its owner's group, so that the owner's jobs together weigh as one (issue 22
        # item 11).
        job = V1Job(name, parents,
                    groups.path(owner) if groups is not None and owner is not None else None)
        try:
            for controller, path in job.dirs.items():
                if path not in made.values():
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(self.parents[controller])
                    os.mkdir(path)
                made[controller] = path
            d = job.dirs
            if limits.memory is not None:
                _apply(f"{d['memory']}/memory.limit_in_bytes", str(limits.memory), "--memory")
                with contextlib.suppress(FileNotFoundError):  # swap accounting is off
                    write_file(f"{d['memory']}/memory.memsw.limit_in_bytes", str(limits.memory))
            if limits.cpus is not None:
                quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
                _apply(f"{d['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US), "--cpus")
                _apply(f"{d['cpu']}/cpu.cfs_quota_us", str(quota), "--cpus")
            if limits.pids is not None:
                _apply(f"{d['pids']}/pids.max", str(limits.pids), "--pids")
            for option, file, entries in (
                    ("--io-read-bps", "blkio.throttle.read_bps_device", limits.io_read_bps),
                    ("--io-write-bps", "blkio.throttle.write_bps_device", limits.io_write_bps)):
                for device, rate in entries:
                    _apply(f"{d['blkio']}/{file}", f"{devices[device]} {rate}",
                           f"{option} {device}")
        except BaseException:
            for path in dict.fromkeys(made.values()):
                _rmdir(path)
            raise
        return job

    def leftovers(self) -> list[JobCgroup]:
        names: dict[str, None] = {}
        for parent in self.parents.values():
            names.update(dict.fromkeys(_job_dirs(parent)))
        nested: dict[str, str] = {}  # cpu: job cgroups inside owner groups
        if "cpu" in self.parents:
            cpu = self.parents["cpu"]
            for owner in _job_dirs(cpu, OWNER_PREFIX):
                for name in _job_dirs(f"{cpu}/{owner}"):
                    nested[name] = f"{cpu}/{owner}/{name}"
                    names[name] = None
        out: list[JobCgroup] = []
        cpu_parent = self.parents.get("cpu")
        for name in names:
            group = os.path.dirname(nested[name]) if name in nested else None
            parents = {c: p for c, p in self.parents.items() if os.path.isdir(f"{p}/{name}")
                       or (group is not None and p == cpu_parent)}
            out.append(V1Job(name, parents, group))
        return out

    def owner_groups(self) -> OwnerGroups | None:
        if "cpu" not in self.parents:
            return None
        if not hasattr(self, "_owners"):
            self._owners = OwnerGroups(self.parents["cpu"], per_thread=True,
                                       home=self._home("cpu"))
        return self._owners

    def _home(self, controller: str) -> str:
        """jobd's own cgroup in ``controller``'s hierarchy, where its threads return:
        in the cpu hierarchy jobd's own CPU group (OwnerGroups.home); its tracking
        leaf in the leaf's hierarchy (co-mounted controllers share it); else the
        directory above the jobs' parent."""
        parent = self.parents[controller]
        owners: OwnerGroups | None = getattr(self, "_owners", None)
        if owners is not None and parent == self.parents["cpu"]:
            return owners.home  # jobd's own CPU group, once it is in it (enter_daemon)
        leaf, leaf_controller = self.daemon_leaf()
        return leaf if parent == self.parents[leaf_controller] else os.path.dirname(parent)

    def thread_moves(self, job: JobCgroup) -> list[tuple[str, str]] | None:
        assert isinstance(job, V1Job)
        moves: dict[str, str] = {}
        for controller, path in job.dirs.items():
            moves.setdefault(f"{path}/tasks", f"{self._home(controller)}/tasks")
        return list(moves.items())

    def daemon_leaf(self) -> tuple[str, str]:
        # One hierarchy is enough to find processes: the one that kills (freezer),
        # else one without limits of its own.
        controller = next(c for c in ("freezer", "pids", "cpuacct", "memory", "cpu", "blkio")
                          if c in self.parents)
        return f"{self.parents[controller]}/{DAEMON_LEAF}", controller

    def close(self) -> None:
        if "cpu" in self.parents:
            OwnerGroups(self.parents["cpu"], per_thread=True, home="").remove_empty()
        for parent in dict.fromkeys(self.parents.values()):
            with contextlib.suppress(OSError):
                _rmdir(parent)


def _job_dirs(parent: str, prefix: str = JOB_PREFIX) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(parent)
                      if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _kill_listed(procs: str) -> list[int]:
    """SIGKILL each listed process through a pidfd; returns the pidfds."""
    pidfds = []
    try:
        for pid in _pids(procs):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            pidfds.append(pidfd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except BaseException:
        for pidfd in pidfds:
            os.close(pidfd)
        raise
    return pidfds


async def _kill_by_rounds(job: JobCgroup) -> None:
    """Kill what is listed, wait for exactly those, again until nothing is left."""
    for _ in range(V1_KILL_ROUNDS):
        pidfds = await trio.to_thread.run_sync(job.kill_now)
        if not pidfds and not job.populated():
            return
        try:
            for pidfd in pidfds:
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    await job.wait_empty()
