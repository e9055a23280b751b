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

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._fields import check, check_type, get_int, get_map
from ._status import JobStatus

#: Major version: a server refuses a hello with another major version.
PROTOCOL_VERSION = 1
#: Minor version: additions that older peers can ignore (new optional fields), or
#: that a peer uses only when the other side's minor is at least theirs.
#: 1 (2026-11-30): list filters (owner, states, since) and count; prune.
PROTOCOL_MINOR = 1

#: Integers on the wire are msgpack uint64 at most.
_UINT_LIMIT = 1 << 64


def _uint(name: str, value: object) -> None:
    check_type(name, value, int)
    assert isinstance(value, int)
    check(value >= 0, f"{name} must not be negative")
    check(value < _UINT_LIMIT, f"{name} must be below 2**64")


def _check_arg(name: str, value: object) -> None:
    check(isinstance(value, bytes), f"{name} must be bytes")
    assert isinstance(value, bytes)
    check(b"\0" not in value, f"{name} must not contain a NUL byte")


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
        _uint("job", self.job)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "job": self.job}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"))


@dataclass(frozen=True, slots=True)
class _OutputRequest(_Message):
    """The shape of the two output requests: a job ID and a position."""

    job: int
    position: int = 0

    def __post_init__(self) -> None:
        _uint("job", self.job)
        _uint("position", self.position)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "job": self.job, "position": self.position}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"), get_int(m, "position", 0))


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
