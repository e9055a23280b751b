"""Server-to-client messages: the welcome, results, output, errors (see _base.py)."""

from __future__ import annotations

from ._base import _JobMessage, _Message, _StatusReply, _uint
from ._errors import ErrorCode
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
from ._requests import _check_tick_interval
from ._status import JobStatus

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any, ClassVar, Self
else:
    from ._record import record as dataclass


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    """The server's answer to an acceptable hello.

    Fields:
      version, minor: the server's protocol version.
      software: free text naming the server, e.g. ``"jobd 0.1.0"``.
      identity: the caller's identity as the server sees it (certificate CN).
      role: the caller's role (certificate OU): observe, control or admin.
      max_frame_size: the largest frame payload the server accepts.
      tick_interval: liveness (optional): the interval the server ticks at, in
        answer to the hello's ``tick_interval`` (it may be longer than asked:
        jobd ticks at most every MIN_TICK_INTERVAL). None: this server sends no
        ticks (it does not know them, or was not asked).
    """

    TYPE: ClassVar[str] = "welcome"

    version: int
    minor: int
    software: str
    identity: str
    role: str
    max_frame_size: int
    tick_interval: float | None = None

    def __post_init__(self) -> None:
        _uint("version", self.version)
        _uint("minor", self.minor)
        for name in ("software", "identity", "role"):
            check_type(name, getattr(self, name), str)
        _uint("max_frame_size", self.max_frame_size)
        check(self.max_frame_size > 0, "max_frame_size must be positive")
        _check_tick_interval(self, self.tick_interval)

    def to_wire(self) -> dict[str, Any]:
        out = {"type": self.TYPE, "version": self.version, "minor": self.minor,
               "software": self.software, "identity": self.identity, "role": self.role,
               "max_frame_size": self.max_frame_size}
        if self.tick_interval is not None:
            out["tick_interval"] = self.tick_interval
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "version"), get_int(m, "minor"), get_str(m, "software"),
                   get_str(m, "identity"), get_str(m, "role"), get_int(m, "max_frame_size"),
                   get_float(m, "tick_interval", None))


@dataclass(frozen=True, slots=True)
class Tick(_Message):
    """Liveness: the server is alive and still working on the request in progress.

    Sent only to a client whose hello asked for ticks (``tick_interval``),
    whenever the server has sent nothing for that long while a request is in
    progress (a stream of a silent job, a stop waiting for its job). It may
    arrive in any state after the welcome and changes nothing: clients drop
    it (``ClientConnection.next_event`` never returns one). No fields.
    """

    TYPE: ClassVar[str] = "tick"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Started(_StatusReply):
    """The job a :class:`Start` created (also when it failed to execute: state ``error``).

    Fields:
      status: the new job's :class:`JobStatus`.
    """

    TYPE: ClassVar[str] = "started"


@dataclass(frozen=True, slots=True)
class Stopped(_StatusReply):
    """The answer to :class:`Stop`, sent once every process of the job is gone.

    Fields:
      status: the job's final :class:`JobStatus`.
    """

    TYPE: ClassVar[str] = "stopped"


@dataclass(frozen=True, slots=True)
class StatusResult(_StatusReply):
    """The answer to :class:`GetStatus`.

    Fields:
      status: the job's :class:`JobStatus`.
    """

    TYPE: ClassVar[str] = "status_result"


@dataclass(frozen=True, slots=True)
class JobList(_Message):
    """One page of the answer to :class:`ListJobs`.

    Fields:
      jobs: the statuses, in increasing ID order.
      more: True when more jobs follow: ask again with ``after`` = the last ID.
      total: how many jobs match the request's filters, if it asked (``count``).
    """

    TYPE: ClassVar[str] = "jobs"

    jobs: tuple[JobStatus, ...]
    more: bool = False
    total: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.jobs, list):
            object.__setattr__(self, "jobs", tuple(self.jobs))
        check_type("jobs", self.jobs, tuple)
        check(all(isinstance(s, JobStatus) for s in self.jobs), "jobs entries must be JobStatus")
        check_type("more", self.more, bool)
        check_type("total", self.total, int, optional=True)

    def to_wire(self) -> dict[str, Any]:
        out = {"type": self.TYPE, "jobs": [s.to_wire() for s in self.jobs], "more": self.more}
        if self.total is not None:
            out["total"] = self.total
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        jobs = get_list(m, "jobs")
        check(all(isinstance(s, dict) for s in jobs), "jobs entries must be maps")
        return cls(tuple(JobStatus.from_wire(s) for s in jobs), get_bool(m, "more"),
                   get_int(m, "total", None))


@dataclass(frozen=True, slots=True)
class Deleted(_JobMessage):
    """The answer to :class:`Delete`.

    Fields:
      job: the deleted job's ID.
    """

    TYPE: ClassVar[str] = "deleted"


@dataclass(frozen=True, slots=True)
class Pruned(_Message):
    """The answer to :class:`Prune`.

    Fields:
      removed: how many jobs were removed.
    """

    TYPE: ClassVar[str] = "pruned"

    removed: int

    def __post_init__(self) -> None:
        check_type("removed", self.removed, int)
        check(self.removed >= 0, "removed must not be negative")

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "removed": self.removed}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "removed"))


@dataclass(frozen=True, slots=True)
class OutputChunk(_Message):
    """Some of a job's output, in a stream or output response.

    Fields:
      fd: 1 for stdout, 2 for stderr.
      data: the bytes, exactly as the job wrote them.
      position: an opaque, increasing integer; a new Stream or Output request
        with this position resumes right after this chunk.
      time: (minor 1) when jobd read these bytes, Unix seconds; sent only
        when the request asked for ``timestamps``, else None.
    """

    TYPE: ClassVar[str] = "out"

    fd: int
    data: bytes
    position: int
    time: float | None = None

    def __post_init__(self) -> None:
        check_type("fd", self.fd, int)
        check(self.fd in (1, 2), "fd must be 1 (stdout) or 2 (stderr)")
        if isinstance(self.data, bytearray | memoryview):
            object.__setattr__(self, "data", bytes(self.data))
        check_type("data", self.data, bytes)
        _uint("position", self.position)
        if self.time is not None:
            check_type("time", self.time, (int, float))
            object.__setattr__(self, "time", float(self.time))

    def to_wire(self) -> dict[str, Any]:
        # Key order matters: encode_output_chunk() builds the same bytes by hand
        # (for chunks without a time, the only ones it makes).
        out = {"type": self.TYPE, "fd": self.fd, "data": self.data, "position": self.position}
        if self.time is not None:
            out["time"] = self.time
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        time = m.get("time")
        return cls(get_int(m, "fd"), get_bytes(m, "data"), get_int(m, "position"),
                   None if time is None else get_float(m, "time"))


@dataclass(frozen=True, slots=True)
class End(_Message):
    """The last frame of a stream or output response.

    Fields:
      status: the job's status when the response ended (final for a stream).
      position: the position after the last chunk sent (the request's
        position when no chunk was sent): resume from here.
    """

    TYPE: ClassVar[str] = "end"

    status: JobStatus
    position: int

    def __post_init__(self) -> None:
        check_type("status", self.status, JobStatus)
        _uint("position", self.position)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "status": self.status.to_wire(), "position": self.position}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(JobStatus.from_wire(get_map(m, "status")), get_int(m, "position"))


@dataclass(frozen=True, slots=True)
class Error(_Message):
    """A request failed, or the server refuses or ends the connection.

    Fields:
      code: an :class:`ErrorCode` (a plain string is converted; unknown ones
        are rejected).
      message: a human-readable explanation, e.g. ``"process not found"``.
    """

    TYPE: ClassVar[str] = "error"

    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            check_type("code", self.code, str)
            try:
                object.__setattr__(self, "code", ErrorCode(self.code))
            except ValueError:
                raise FieldError(f"unknown error code {self.code!r}") from None
        check_type("message", self.message, str)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "code": self.code.value, "message": self.message}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_str(m, "code"), get_str(m, "message"))


__all__ = [
    "Deleted",
    "End",
    "Error",
    "JobList",
    "Pruned",
    "OutputChunk",
    "Started",
    "StatusResult",
    "Stopped",
    "Welcome",
]
