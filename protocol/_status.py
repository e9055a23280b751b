"""The one job-status type, shared by the engine, the server and the clients.

A :class:`JobStatus` is what ``status``, ``list``, ``start``, ``stop`` and the
``end`` frame of a stream carry. It is a frozen dataclass that validates itself
when built and converts to and from its wire map (``to_wire``/``from_wire``).
"""

from __future__ import annotations

import enum
import math

from ._fields import (
    FieldError,
    check,
    check_type,
    get_bool,
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
)
from ._labels import check_labels, labels_from_wire, labels_to_wire
from ._record import fields_of
from ._terminal import Terminal

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

#: The namespaces a job may ask to be isolated in (SPEC §8).
ISOLATION_KINDS = frozenset({"pid", "mount", "net"})


class JobState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"  # ended on its own; exit_code is set
    STOPPED = "stopped"  # a stop was requested before it ended
    KILLED = "killed"  # ended by a signal nobody requested; signal is set
    ERROR = "error"  # never ran, or was lost; error is set


@dataclass(frozen=True)
class Limits:
    """Resource limits and isolation requested for a job (SPEC §8).

    Fields:
      memory: bytes (``memory.max``), or None for no limit.
      cpus: CPUs as a fraction (0.5 = half a core), or None.
      pids: maximum number of tasks, or None.
      io_read_bps / io_write_bps: ((device path, bytes per second), ...).
      isolate: names from :data:`ISOLATION_KINDS`, sorted, no repeats.
    """

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    io_read_bps: tuple[tuple[str, int], ...] = ()
    io_write_bps: tuple[tuple[str, int], ...] = ()
    isolate: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("memory", "pids"):
            value = getattr(self, name)
            check_type(name, value, int, optional=True)
            check(value is None or value > 0, f"{name} must be positive")
        check_type("cpus", self.cpus, (int, float), optional=True)
        if self.cpus is not None:
            try:
                cpus = float(self.cpus)
            except OverflowError:  # an integer beyond a float's range
                cpus = math.inf
            object.__setattr__(self, "cpus", cpus)
            check(math.isfinite(cpus) and cpus > 0, "cpus must be a finite positive number")
        for name in ("io_read_bps", "io_write_bps"):
            value = getattr(self, name)
            check_type(name, value, tuple)
            for item in value:
                check(
                    isinstance(item, tuple)
                    and len(item) == 2
                    and isinstance(item[0], str)
                    and isinstance(item[1], int)
                    and not isinstance(item[1], bool)
                    and item[1] > 0,
                    f"{name} entries must be (device, positive bytes per second)",
                )
        check_type("isolate", self.isolate, tuple)
        for kind in self.isolate:
            check(kind in ISOLATION_KINDS, f"unknown isolation {kind!r}")
        check(len(set(self.isolate)) == len(self.isolate), "isolation kinds repeat")
        object.__setattr__(self, "isolate", tuple(sorted(self.isolate)))

    def is_empty(self) -> bool:
        return self == Limits()

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.cpus is not None:
            out["cpus"] = self.cpus
        if self.pids is not None:
            out["pids"] = self.pids
        if self.io_read_bps:
            out["io_read_bps"] = [[d, r] for d, r in self.io_read_bps]
        if self.io_write_bps:
            out["io_write_bps"] = [[d, r] for d, r in self.io_write_bps]
        if self.isolate:
            out["isolate"] = list(self.isolate)
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Limits:
        def pairs(key: str) -> tuple[tuple[str, int], ...]:
            items = get_list(m, key, [])
            out = []
            for item in items:
                check(isinstance(item, list | tuple) and len(item) == 2, f"{key} entries are pairs")
                out.append((item[0], item[1]))
            return tuple(out)

        isolate = get_list(m, "isolate", [])
        check(all(isinstance(k, str) for k in isolate), "isolate entries must be strings")
        return cls(
            memory=get_int(m, "memory", None),
            cpus=get_float(m, "cpus", None),
            pids=get_int(m, "pids", None),
            io_read_bps=pairs("io_read_bps"),
            io_write_bps=pairs("io_write_bps"),
            isolate=tuple(isolate),
        )


@dataclass(frozen=True)
class JobStatus:
    """Everything known about one job.

    Fields:
      id: the job's integer ID (assigned in order, never reused).
      owner: the CN of the client that started it.
      argv: the command and its arguments, as bytes.
      state: a :class:`JobState`.
      exit_code: the exit code when it exited (also kept for ``stopped`` jobs
        that exited with a code while stopping).
      signal: the signal name (``SIGSEGV``) when it ended by a signal.
      error: why it never ran or was lost (state ``error``).
      oom: True when the kernel's OOM killer ended it.
      pid: the main process's PID once it started.
      created / started / ended: Unix times in seconds.
      output_bytes: output bytes kept in the job's log.
      dropped_bytes: output bytes drained but dropped (cap or full disk).
      limits: the limits the job runs with, if any.
      peak_memory: peak memory in bytes, where a cgroup measured it.
      cpu_time: CPU seconds used, where known.
      stdin: (minor 2) True when the job's stdin is a pipe that ``attach``
        writes to (a job started with ``stdin``, or on a terminal).
      tty: (minor 2) the :class:`Terminal` the job runs on (its size at start),
        or None: its output is then the terminal's, all of it on stdout (fd 1).
      labels: (minor 2) the job's labels, ((key, value), ...) sorted by key
        (``_labels.py`` has their bounds).
    """

    id: int
    owner: str
    argv: tuple[bytes, ...]
    state: JobState
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    oom: bool = False
    pid: int | None = None
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    output_bytes: int = 0
    dropped_bytes: int = 0
    limits: Limits | None = None
    peak_memory: int | None = None
    cpu_time: float | None = None
    stdin: bool = False
    tty: Terminal | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_type("id", self.id, int)
        check(self.id >= 0, "id must not be negative")
        check_type("owner", self.owner, str)
        if isinstance(self.argv, list):
            object.__setattr__(self, "argv", tuple(self.argv))
        check_type("argv", self.argv, tuple)
        check(all(isinstance(a, bytes) for a in self.argv), "argv entries must be bytes")
        if not isinstance(self.state, JobState):
            try:
                object.__setattr__(self, "state", JobState(self.state))
            except ValueError:
                raise FieldError(f"unknown job state {self.state!r}") from None
        check_type("exit_code", self.exit_code, int, optional=True)
        check_type("signal", self.signal, str, optional=True)
        check_type("error", self.error, str, optional=True)
        check_type("oom", self.oom, bool)
        check_type("pid", self.pid, int, optional=True)
        for name in ("created", "started", "ended", "cpu_time"):
            value = getattr(self, name)
            check_type(name, value, (int, float), optional=name != "created")
            if value is not None:
                object.__setattr__(self, name, float(value))
        check_type("output_bytes", self.output_bytes, int)
        check_type("dropped_bytes", self.dropped_bytes, int)
        check_type("limits", self.limits, Limits, optional=True)
        check_type("peak_memory", self.peak_memory, int, optional=True)
        check_type("stdin", self.stdin, bool)
        check_type("tty", self.tty, Terminal, optional=True)
        if self.labels:
            object.__setattr__(self, "labels", check_labels("labels", self.labels))
        else:
            object.__setattr__(self, "labels", ())

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    def describe(self) -> str:
        """The one-line status the CLI prints (SPEC §2)."""
        if self.state is JobState.EXITED:
            return f"exited: {self.exit_code}"
        if self.state is JobState.KILLED:
            text = f"killed: {self.signal}"
            return text + " (out of memory)" if self.oom else text
        if self.state is JobState.ERROR:
            return f"error: {self.error}"
        return self.state.value

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "owner": self.owner,
            "argv": list(self.argv),
            "state": self.state.value,
            "created": self.created,
            "output_bytes": self.output_bytes,
            "dropped_bytes": self.dropped_bytes,
        }
        for name in ("exit_code", "signal", "error", "pid", "started", "ended",
                     "peak_memory", "cpu_time"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.oom:
            out["oom"] = True
        if self.limits is not None:
            out["limits"] = self.limits.to_wire()
        if self.labels:
            out["labels"] = labels_to_wire(self.labels)
        if self.stdin:
            out["stdin"] = True
        if self.tty is not None:
            out["tty"] = self.tty.to_wire()
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> JobStatus:
        argv = get_list(m, "argv")
        check(all(isinstance(a, bytes) for a in argv), "argv entries must be binary")
        limits = get_map(m, "limits", None)
        tty = get_map(m, "tty", None)
        return cls(
            id=get_int(m, "id"),
            owner=get_str(m, "owner"),
            argv=tuple(argv),
            state=JobState(_state(get_str(m, "state"))),
            exit_code=get_int(m, "exit_code", None),
            signal=get_str(m, "signal", None),
            error=get_str(m, "error", None),
            oom=get_bool(m, "oom", False),
            pid=get_int(m, "pid", None),
            created=get_float(m, "created"),
            started=get_float(m, "started", None),
            ended=get_float(m, "ended", None),
            output_bytes=get_int(m, "output_bytes", 0),
            dropped_bytes=get_int(m, "dropped_bytes", 0),
            limits=Limits.from_wire(limits) if limits is not None else None,
            peak_memory=get_int(m, "peak_memory", None),
            cpu_time=get_float(m, "cpu_time", None),
            labels=labels_from_wire(m, "labels"),
            stdin=get_bool(m, "stdin", False),
            tty=Terminal.from_wire(tty) if tty is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (argv decoded with surrogateescape) for ``--json``."""
        import os

        out = self.to_wire()
        out["argv"] = [os.fsdecode(a) for a in self.argv]
        out["status"] = self.describe()
        if self.limits is not None:
            out["limits"] = self.limits.to_wire()
        return out


def _state(value: object) -> str:
    assert isinstance(value, str)
    check(value in {s.value for s in JobState}, f"unknown job state {value!r}")
    return value


# Keep the field list importable for tests that check to_wire/from_wire cover every field.
STATUS_FIELDS = tuple(name for name in fields_of(JobStatus) if not name.startswith("_"))
__all__ = ["ISOLATION_KINDS", "STATUS_FIELDS", "JobState", "JobStatus", "Limits"]
