"""Client-to-server messages: the hello and the requests (see _base.py for the shape)."""

from __future__ import annotations

import math
import posixpath

from ._base import (
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    _check_arg,
    _flag,
    _id,
    _JobMessage,
    _Message,
    _OutputRequest,
    _uint,
)
from ._bounds import (
    MAX_ARG_BYTES,
    MAX_ARGV_BYTES,
    MAX_ARGV_ENTRIES,
    MAX_CPUS,
    MAX_ENV_BYTES,
    MAX_ENV_ENTRIES,
    MAX_IO_DEVICES,
    MAX_LIMIT_VALUE,
    MAX_PATH_BYTES,
    MAX_PIDS,
)
from ._fields import (
    FieldError,
    check,
    check_type,
    get_bool,
    get_bytes,
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
)
from ._labels import check_labels, labels_from_wire, labels_to_wire
from ._status import JobState, Limits
from ._terminal import Terminal

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass, replace
    from typing import Any, ClassVar, Self
else:
    from ._record import record as dataclass
    from ._record import replace

#: Longest owner a list filter may name (a certificate CN is at most 64 characters).
MAX_OWNER_FILTER = 1024

#: Longest ``traceparent`` accepted. A W3C traceparent of version 00 is 55
#: characters; later versions may append fields, so leave room, but bound it.
MAX_TRACEPARENT = 256


def _check_traceparent(value: object) -> None:
    check_type("traceparent", value, str, optional=True)
    if value is not None:
        assert isinstance(value, str)
        check(len(value) <= MAX_TRACEPARENT,
              f"traceparent must be at most {MAX_TRACEPARENT} characters")


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """The client's first frame.

    Fields:
      version: the client's major protocol version (int).
      minor: the client's minor protocol version (int).
      software: free text naming the client, e.g. ``"jobctl 0.1.0"``.
      tick_interval: liveness (optional): seconds, in (0, MAX_TICK_INTERVAL];
        the client asks for a ``tick`` frame whenever the server has sent
        nothing for this long while a request is in progress (docs/protocol.md
        section 4, ``tick``). None: no ticks.
    """

    TYPE: ClassVar[str] = "hello"

    version: int = PROTOCOL_VERSION
    minor: int = PROTOCOL_MINOR
    software: str = ""
    tick_interval: float | None = None

    def __post_init__(self) -> None:
        _uint("version", self.version)
        _uint("minor", self.minor)
        check_type("software", self.software, str)
        _check_tick_interval(self, self.tick_interval)

    def to_wire(self) -> dict[str, Any]:
        out = {"type": self.TYPE, "version": self.version, "minor": self.minor,
               "software": self.software}
        if self.tick_interval is not None:
            out["tick_interval"] = self.tick_interval
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        # Only "version" is required: it is the one field every future major
        # version keeps, so that any hello can at least be refused clearly.
        return cls(get_int(m, "version"), get_int(m, "minor", 0), get_str(m, "software", ""),
                   get_float(m, "tick_interval", None))


#: The longest interval between ticks a peer may ask for or announce (an hour):
#: beyond it TCP keepalive notices a dead peer first anyway.
MAX_TICK_INTERVAL = 3600.0


def _check_tick_interval(message: Any, value: float | None) -> None:
    if value is not None:
        check_type("tick_interval", value, (int, float))
        object.__setattr__(message, "tick_interval", float(value))
        check(math.isfinite(value) and 0 < value <= MAX_TICK_INTERVAL,
              f"tick_interval must be a number of seconds in (0, {MAX_TICK_INTERVAL:g}]")


@dataclass(frozen=True, slots=True)
class Start(_Message):
    """Start a job.

    Fields:
      argv: the command and its arguments, as bytes; 1 to MAX_ARGV_ENTRIES, none
        containing a NUL byte, each at most MAX_ARG_BYTES, MAX_ARGV_BYTES in all.
        Executed directly, never through a shell.
      cwd: the working directory (bytes, no NUL, at most MAX_PATH_BYTES), or None
        for the server's default.
      env: the job's whole environment as ((name, value), ...) byte pairs, or
        None for the server's default. Names are non-empty, unique, without
        ``=``; no NUL anywhere; at most MAX_ENV_ENTRIES pairs, each ``name=value``
        at most MAX_ARG_BYTES, MAX_ENV_BYTES in all.
      limits: a :class:`Limits`, or None for the server's defaults; checked and
        its device paths normalised by :func:`request_limits`.
      env_merge: (minor 1) True: ``env`` is added to the server's environment
        for jobs (replacing variables of the same name) instead of being the
        whole environment.
      traceparent: a W3C Trace Context ``traceparent`` (str, at most
        MAX_TRACEPARENT characters) naming the caller's span, or None. A server
        that traces requests makes it the parent of the request's span; one
        that does not (or an older one) ignores it.
      stdin: (minor 2) True: the job's stdin is a pipe kept open for ``attach``
        requests to write to (else /dev/null).
      tty: (minor 2) a :class:`Terminal`: the job runs on a pseudo-terminal of
        that size, as its controlling terminal, with ``TERM`` set to its
        ``term``; stdin, stdout and stderr are the terminal (``stdin`` is
        implied). None: no terminal.
      labels: (minor 2) ((key, value), ...) to attach to the job, sorted by key,
        each key once; bounds in ``_labels.py``. A server before 1.2 would
        ignore them: clients send them only to a 1.2 server.

    Every bound is in ``_bounds.py``: what a start makes the server store or echo
    stays small enough for one frame.
    """

    TYPE: ClassVar[str] = "start"

    argv: tuple[bytes, ...]
    cwd: bytes | None = None
    env: tuple[tuple[bytes, bytes], ...] | None = None
    limits: Limits | None = None
    env_merge: bool = False
    traceparent: str | None = None
    stdin: bool = False
    tty: Terminal | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_type("stdin", self.stdin, bool)
        check_type("tty", self.tty, Terminal, optional=True)
        if isinstance(self.argv, list):
            object.__setattr__(self, "argv", tuple(self.argv))
        check_type("argv", self.argv, tuple)
        check(len(self.argv) > 0, "argv must not be empty")
        check(len(self.argv) <= MAX_ARGV_ENTRIES,
              f"argv has {len(self.argv)} entries, more than {MAX_ARGV_ENTRIES}")
        total = 0
        for arg in self.argv:
            _check_arg("argv entries", arg)
            check(len(arg) <= MAX_ARG_BYTES,
                  f"an argv entry of {len(arg)} bytes is longer than {MAX_ARG_BYTES}")
            total += len(arg)
        check(total <= MAX_ARGV_BYTES,
              f"command line longer than {MAX_ARGV_BYTES} bytes ({total} bytes)")
        if self.cwd is not None:
            _check_arg("cwd", self.cwd)
            check(self.cwd != b"", "cwd must not be empty")
            check(len(self.cwd) <= MAX_PATH_BYTES,
                  f"cwd of {len(self.cwd)} bytes is longer than {MAX_PATH_BYTES} (PATH_MAX)")
        if self.env is not None:
            check_type("env", self.env, (tuple, list))
            check(len(self.env) <= MAX_ENV_ENTRIES,
                  f"env has {len(self.env)} entries, more than {MAX_ENV_ENTRIES}")
            env = tuple(
                tuple(item) if isinstance(item, list | tuple) else item for item in self.env
            )
            object.__setattr__(self, "env", env)
            names = set()
            total = 0
            for item in env:
                check(isinstance(item, tuple) and len(item) == 2,
                      "env entries must be (name, value) pairs")
                name, value = item
                _check_arg("env names", name)
                _check_arg("env values", value)
                check(name != b"" and b"=" not in name,
                      "env names must be non-empty and contain no '='")
                check(name not in names, f"env name {name!r} repeats")
                names.add(name)
                size = len(name) + 1 + len(value)
                check(size <= MAX_ARG_BYTES,
                      f"env variable {name[:64]!r} of {size} bytes is longer than "
                      f"{MAX_ARG_BYTES}")
                total += size
            check(total <= MAX_ENV_BYTES,
                  f"env larger than {MAX_ENV_BYTES} bytes ({total} bytes)")
        check_type("limits", self.limits, Limits, optional=True)
        check_type("env_merge", self.env_merge, bool)
        if self.limits is not None:
            object.__setattr__(self, "limits", request_limits(self.limits))
        _check_traceparent(self.traceparent)
        object.__setattr__(self, "labels", check_labels("labels", self.labels)
                           if self.labels else ())

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "argv": list(self.argv)}
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.env is not None:
            out["env"] = [[name, value] for name, value in self.env]
        if self.limits is not None:
            out["limits"] = self.limits.to_wire()
        if self.env_merge:
            out["env_merge"] = True
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        if self.labels:
            out["labels"] = labels_to_wire(self.labels)
        if self.stdin:
            out["stdin"] = True
        if self.tty is not None:
            out["tty"] = self.tty.to_wire()
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        argv = get_list(m, "argv")
        env = get_list(m, "env", None)
        limits = get_map(m, "limits", None)
        tty = get_map(m, "tty", None)
        return cls(
            argv=tuple(argv),
            cwd=get_bytes(m, "cwd", None),
            env=tuple(env) if env is not None else None,
            limits=Limits.from_wire(limits) if limits is not None else None,
            env_merge=_flag(m, "env_merge"),
            traceparent=get_str(m, "traceparent", None),
            labels=labels_from_wire(m, "labels"),
            stdin=_flag(m, "stdin"),
            tty=Terminal.from_wire(tty) if tty is not None else None,
        )


def request_limits(limits: Limits) -> Limits:
    """*limits* as a start request may ask for them, device paths canonical.

    Every value within the kernel's range (:mod:`._bounds`); at most
    MAX_IO_DEVICES entries per direction, each path at most MAX_PATH_BYTES,
    normalised lexically (``/dev/./sda`` and ``/dev//sda`` are ``/dev/sda``) and
    named once. Symbolic links are the server's to resolve (it compares the
    devices' numbers). Raises FieldError.
    """
    check(limits.memory is None or limits.memory <= MAX_LIMIT_VALUE,
          f"memory must be at most {MAX_LIMIT_VALUE} bytes")
    check(limits.pids is None or limits.pids <= MAX_PIDS, f"pids must be at most {MAX_PIDS}")
    check(limits.cpus is None or limits.cpus <= MAX_CPUS, f"cpus must be at most {MAX_CPUS:g}")
    io: dict[str, tuple[tuple[str, int], ...]] = {}
    for name in ("io_read_bps", "io_write_bps"):
        entries = getattr(limits, name)
        check(len(entries) <= MAX_IO_DEVICES,
              f"{name} has {len(entries)} entries, more than {MAX_IO_DEVICES} per direction")
        seen: set[str] = set()
        out = []
        for device, rate in entries:
            check(device != "" and "\0" not in device,
                  f"{name} device paths must be non-empty, without NUL")
            check(len(device.encode("utf-8", "surrogatepass")) <= MAX_PATH_BYTES,
                  f"{name} device paths must be at most {MAX_PATH_BYTES} bytes")
            check(rate <= MAX_LIMIT_VALUE, f"{name} rates must be at most {MAX_LIMIT_VALUE}")
            path = posixpath.normpath(device)
            check(path not in seen, f"{name}: {path} is given more than once")
            seen.add(path)
            out.append((path, rate))
        io[name] = tuple(out)
    if io["io_read_bps"] == limits.io_read_bps and io["io_write_bps"] == limits.io_write_bps:
        return limits
    return replace(limits, io_read_bps=io["io_read_bps"], io_write_bps=io["io_write_bps"])


@dataclass(frozen=True, slots=True)
class Stop(_Message):
    """Stop a running job (answered by :class:`Stopped` once every process is gone).

    Fields:
      job: the job's ID.
      grace: seconds between the steps of the stop sequence (SIGINT, SIGTERM,
        SIGKILL); 0 sends SIGKILL at once; None for the server's default.
      traceparent: as for :class:`Start`.
    """

    TYPE: ClassVar[str] = "stop"

    job: int
    grace: float | None = None
    traceparent: str | None = None

    def __post_init__(self) -> None:
        _id("job", self.job)
        if self.grace is not None:
            check_type("grace", self.grace, (int, float))
            object.__setattr__(self, "grace", float(self.grace))
            check(math.isfinite(self.grace) and self.grace >= 0,
                  "grace must be a finite number of seconds, not negative")
        _check_traceparent(self.traceparent)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "job": self.job}
        if self.grace is not None:
            out["grace"] = self.grace
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"), get_float(m, "grace", None),
                   get_str(m, "traceparent", None))


@dataclass(frozen=True, slots=True)
class GetStatus(_JobMessage):
    """Ask for one job's status (answered by :class:`StatusResult`).

    Fields:
      job: the job's ID.
    """

    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class ListJobs(_Message):
    """List the jobs the caller may see, in ID order (answered by :class:`JobList`).

    Fields:
      after: only jobs whose ID is greater than this (0: from the first; at
        most MAX_JOB_ID, 2**63 - 1). The next page's ``after`` is the last ID of
        the page before.
      owner: only this owner's jobs (optional).
      states: only jobs in one of these states (optional; empty: any).
      since: only jobs created at or after this time, seconds since the
        Unix epoch (optional).
      count: also answer the total number of jobs that match (``JobList.total``);
        it costs an index scan, so a client asks for it once, on its first page.
      labels: (minor 2) only jobs that carry every one of these labels (key and
        value equal); at most MAX_LABELS.
    """

    TYPE: ClassVar[str] = "list"

    after: int = 0
    owner: str | None = None
    states: tuple[JobState, ...] = ()
    since: float | None = None
    count: bool = False
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _id("after", self.after)
        check_type("owner", self.owner, str, optional=True)
        check(self.owner is None or len(self.owner) <= MAX_OWNER_FILTER,
              f"owner longer than {MAX_OWNER_FILTER} characters")
        if isinstance(self.states, list):
            object.__setattr__(self, "states", tuple(self.states))
        check_type("states", self.states, tuple)
        check(len(self.states) <= len(JobState), "too many states")
        try:
            object.__setattr__(self, "states", tuple(JobState(s) for s in self.states))
        except ValueError:
            raise FieldError(f"unknown job state in {list(self.states)!r}") from None
        check_type("since", self.since, (int, float), optional=True)
        check(self.since is None or math.isfinite(self.since), "since must be finite")
        check_type("count", self.count, bool)
        object.__setattr__(self, "labels", check_labels("labels", self.labels)
                           if self.labels else ())

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "after": self.after}
        if self.owner is not None:
            out["owner"] = self.owner
        if self.states:
            out["states"] = [s.value for s in self.states]
        if self.since is not None:
            out["since"] = self.since
        if self.count:
            out["count"] = True
        if self.labels:
            out["labels"] = labels_to_wire(self.labels)
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        states = get_list(m, "states", [])
        check(all(isinstance(x, str) for x in states), "states entries must be strings")
        return cls(get_int(m, "after", 0), get_str(m, "owner", None), tuple(states),
                   get_float(m, "since", None), get_bool(m, "count", False),
                   labels_from_wire(m, "labels"))


@dataclass(frozen=True, slots=True)
class Stream(_OutputRequest):
    """Follow a job's output live until the job ends (answered by chunks then :class:`End`).

    Fields:
      job: the job's ID.
      position: 0 for the first byte, or the position of the last chunk
        received, to resume right after it.
      timestamps: (minor 1) True to get one chunk per record read from the
        job's pipes, each with the time it was read.
      end_only: (minor 1) True to get no chunks: only the end frame, once the
        job has ended (``jobctl wait``).
      resizes: (minor 2) True to get a :class:`Resized` frame, among the
        chunks, wherever the job's terminal was resized (``stream --asciicast``).
    """

    TYPE: ClassVar[str] = "stream"


@dataclass(frozen=True, slots=True)
class Output(_OutputRequest):
    """Read the output that exists now, without following (chunks then :class:`End`).

    Fields:
      job: the job's ID.
      position: as for :class:`Stream`.
      timestamps: as for :class:`Stream`.
      end_only: True to get only the end frame, at once.
      resizes: as for :class:`Stream`.
    """

    TYPE: ClassVar[str] = "output"


@dataclass(frozen=True, slots=True)
class Delete(_JobMessage):
    """Remove a finished job's record and output (answered by :class:`Deleted`).

    Fields:
      job: the job's ID.
    """

    TYPE: ClassVar[str] = "delete"


@dataclass(frozen=True, slots=True)
class Rerun(_JobMessage):
    """Start a new job like an earlier one (protocol 1.2; answered by :class:`Started`):
    the same argv, cwd, environment (as its start asked for it: merged again with
    the server's environment for jobs where it was), requested limits and labels.
    The caller owns the new job; it may rerun its own jobs, an admin any.

    Fields:
      job: the earlier job's ID (running or ended).
    """

    TYPE: ClassVar[str] = "rerun"


@dataclass(frozen=True, slots=True)
class Prune(_Message):
    """Remove the finished jobs that ended more than ``older_than`` seconds ago, with
    their output (admin only; protocol 1.1; answered by :class:`Pruned`).

    Fields:
      older_than: seconds, finite, 0 or more.
    """

    TYPE: ClassVar[str] = "prune"

    older_than: float

    def __post_init__(self) -> None:
        check_type("older_than", self.older_than, (int, float))
        check(math.isfinite(self.older_than) and self.older_than >= 0,
              "older_than must be a finite number of seconds, 0 or more")

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "older_than": self.older_than}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_float(m, "older_than"))


__all__ = ["MAX_TRACEPARENT", "Delete", "GetStatus", "Hello", "ListJobs", "Output", "Prune",
           "Start", "Stop", "Stream"]
