"""What every message shares: the base class, field checks, the version.

Every message validates itself when built (raising :class:`FieldError`), has a
``TYPE`` class attribute (the wire ``type`` string), ``to_wire()`` (the whole
frame's map, ``type`` first) and ``from_wire(map)``. ``from_wire`` ignores
unknown keys (forward compatibility) and the ``type`` key (the decoder already
dispatched on it); a missing or mistyped field raises :class:`FieldError`.

Optional fields whose value is None are left out of the map; a decoder treats
an absent field and an explicit nil alike. Arrays decode as tuples, so that
``from_wire(to_wire(m)) == m``.
"""

from __future__ import annotations

from ._bounds import MAX_JOB_ID
from ._fields import check, check_type, get_bool, get_int, get_map
from ._status import JobStatus

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any, ClassVar, Self
else:
    from ._record import record as dataclass

#: Major version: a server refuses a hello with another major version.
PROTOCOL_VERSION = 1
#: Minor version: additions that older peers can ignore (new optional fields), or
#: that a peer uses only when the other side's minor is at least theirs.
#: 1 (2026-11-30): list filters (owner, states, since) and count; prune;
#: ``stream``/``output`` take ``timestamps`` and ``end_only``; ``out`` may carry
#: ``time``; ``start`` takes ``env_merge``.
#: 2 (2026-12-07): interactive jobs: ``start`` takes ``stdin`` and ``tty``; a
#: status may carry ``stdin`` and ``tty``; the ``attach`` request, during which
#: the client sends ``input``, ``eof``, ``resize`` and ``detach``.
#: 2 (2026-12-07, issue 24): ``stream``/``output`` take ``resizes``, answered with
#: ``resized`` frames among the ``out`` frames (a terminal job's recorded resizes).
#: 2 (2026-12-07, issue 23): ``start`` takes ``labels``, statuses carry them,
#: ``list`` filters on them; the ``rerun`` request (answered by ``started``).
PROTOCOL_MINOR = 2

#: Integers on the wire are msgpack uint64 at most.
_UINT_LIMIT = 1 << 64


def _uint(name: str, value: object) -> None:
    check_type(name, value, int)
    assert isinstance(value, int)
    check(value >= 0, f"{name} must not be negative")
    check(value < _UINT_LIMIT, f"{name} must be below 2**64")


def _id(name: str, value: object) -> None:
    """A job ID, a list's ``after`` or an output position: below 2**63 (MAX_JOB_ID)."""
    _uint(name, value)
    assert isinstance(value, int)
    check(value <= MAX_JOB_ID, f"{name} must be below 2**63")


def _check_arg(name: str, value: object) -> None:
    check(isinstance(value, bytes), f"{name} must be bytes")
    assert isinstance(value, bytes)
    check(b"\0" not in value, f"{name} must not contain a NUL byte")


def _flag(m: dict[str, Any], key: str) -> bool:
    """An optional boolean: absent and nil are False."""
    return m.get(key) is not None and bool(get_bool(m, key))


class _Message:
    """Common base of every message class (no fields of its own)."""

    __slots__ = ()

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _JobMessage(_Message):
    """The shape of messages that carry one job ID (``job``) and nothing else."""

    job: int

    def __post_init__(self) -> None:
        _id("job", self.job)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "job": self.job}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"))


@dataclass(frozen=True, slots=True)
class _OutputRequest(_Message):
    """The shape of the two output requests: a job ID, a position, and (minor 1)
    two flags: ``timestamps`` asks for the time of every record (one ``out``
    frame per record, each with ``time``); ``end_only`` asks for no ``out``
    frame at all, only the ``end`` (for a stream, once the job has ended); and
    (minor 2) ``resizes`` asks for a ``resized`` frame wherever the job's
    terminal was resized, in the log's order."""

    job: int
    position: int = 0
    timestamps: bool = False
    end_only: bool = False
    resizes: bool = False

    def __post_init__(self) -> None:
        _id("job", self.job)
        _id("position", self.position)
        check_type("timestamps", self.timestamps, bool)
        check_type("end_only", self.end_only, bool)
        check_type("resizes", self.resizes, bool)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "job": self.job, "position": self.position}
        # Sent only when set: a request without them is byte for byte a 1.0 request.
        if self.timestamps:
            out["timestamps"] = True
        if self.end_only:
            out["end_only"] = True
        if self.resizes:
            out["resizes"] = True
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"), get_int(m, "position", 0),
                   _flag(m, "timestamps"), _flag(m, "end_only"), _flag(m, "resizes"))


@dataclass(frozen=True, slots=True)
class _StatusReply(_Message):
    """The shape of the replies that carry one job's status (``status``)."""

    status: JobStatus

    def __post_init__(self) -> None:
        check_type("status", self.status, JobStatus)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "status": self.status.to_wire()}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(JobStatus.from_wire(get_map(m, "status")))


__all__ = ["PROTOCOL_MINOR", "PROTOCOL_VERSION"]
