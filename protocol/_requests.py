"""Client-to-server messages: the hello and the requests (see _base.py for the shape)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._base import (
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    _check_arg,
    _JobMessage,
    _Message,
    _OutputRequest,
    _uint,
)
from ._fields import check, check_type, get_bytes, get_float, get_int, get_list, get_map, get_str
from ._status import Limits

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
    """

    TYPE: ClassVar[str] = "hello"

    version: int = PROTOCOL_VERSION
    minor: int = PROTOCOL_MINOR
    software: str = ""

    def __post_init__(self) -> None:
        _uint("version", self.version)
        _uint("minor", self.minor)
        check_type("software", self.software, str)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "version": self.version, "minor": self.minor,
                "software": self.software}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        # Only "version" is required: it is the one field every future major
        # version keeps, so that any hello can at least be refused clearly.
        return cls(get_int(m, "version"), get_int(m, "minor", 0), get_str(m, "software", ""))


@dataclass(frozen=True, slots=True)
class Start(_Message):
    """Start a job.

    Fields:
      argv: the command and its arguments, as bytes; at least one, none
        containing a NUL byte. Executed directly, never through a shell.
      cwd: the working directory (bytes, no NUL), or None for the server's default.
      env: the job's whole environment as ((name, value), ...) byte pairs, or
        None for the server's default. Names are non-empty, unique, without
        ``=``; no NUL anywhere.
      limits: a :class:`Limits`, or None for the server's defaults.
      traceparent: a W3C Trace Context ``traceparent`` (str) naming the caller's
        span, or None. A server that traces requests makes it the parent of the
        request's span; one that does not (or an older one) ignores it.
    """

    TYPE: ClassVar[str] = "start"

    argv: tuple[bytes, ...]
    cwd: bytes | None = None
    env: tuple[tuple[bytes, bytes], ...] | None = None
    limits: Limits | None = None
    traceparent: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.argv, list):
            object.__setattr__(self, "argv", tuple(self.argv))
        check_type("argv", self.argv, tuple)
        check(len(self.argv) > 0, "argv must not be empty")
        for arg in self.argv:
            _check_arg("argv entries", arg)
        if self.cwd is not None:
            _check_arg("cwd", self.cwd)
            check(self.cwd != b"", "cwd must not be empty")
        if self.env is not None:
            check_type("env", self.env, (tuple, list))
            env = tuple(
                tuple(item) if isinstance(item, list | tuple) else item for item in self.env
            )
            object.__setattr__(self, "env", env)
            names = set()
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
        check_type("limits", self.limits, Limits, optional=True)
        _check_traceparent(self.traceparent)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "argv": list(self.argv)}
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.env is not None:
            out["env"] = [[name, value] for name, value in self.env]
        if self.limits is not None:
            out["limits"] = self.limits.to_wire()
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        argv = get_list(m, "argv")
        env = get_list(m, "env", None)
        limits = get_map(m, "limits", None)
        return cls(
            argv=tuple(argv),
            cwd=get_bytes(m, "cwd", None),
            env=tuple(env) if env is not None else None,
            limits=Limits.from_wire(limits) if limits is not None else None,
            traceparent=get_str(m, "traceparent", None),
        )


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
        _uint("job", self.job)
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
      after: only jobs whose ID is greater than this (0: from the first).
    """

    TYPE: ClassVar[str] = "list"

    after: int = 0

    def __post_init__(self) -> None:
        _uint("after", self.after)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "after": self.after}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "after", 0))


@dataclass(frozen=True, slots=True)
class Stream(_OutputRequest):
    """Follow a job's output live until the job ends (answered by chunks then :class:`End`).

    Fields:
      job: the job's ID.
      position: 0 for the first byte, or the position of the last chunk
        received, to resume right after it.
    """

    TYPE: ClassVar[str] = "stream"


@dataclass(frozen=True, slots=True)
class Output(_OutputRequest):
    """Read the output that exists now, without following (chunks then :class:`End`).

    Fields:
      job: the job's ID.
      position: as for :class:`Stream`.
    """

    TYPE: ClassVar[str] = "output"


@dataclass(frozen=True, slots=True)
class Delete(_JobMessage):
    """Remove a finished job's record and output (answered by :class:`Deleted`).

    Fields:
      job: the job's ID.
    """

    TYPE: ClassVar[str] = "delete"



__all__ = ["MAX_TRACEPARENT", "Delete", "GetStatus", "Hello", "ListJobs", "Output", "Start",
           "Stop", "Stream"]
