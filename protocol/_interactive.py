"""Interactive jobs (minor 2): the ``attach`` request and the frames a client
sends while it runs (``input``, ``eof``, ``resize``, ``detach``).

An attach is a response that runs both ways. The server sends the job's output
as ``out`` frames (as a stream does) and ends with ``end`` (the job ended, or
the client detached) or ``error``; meanwhile the client may send its input
frames. See ``_state.py`` (state ATTACH) and docs/protocol.md §4.7.
"""

from __future__ import annotations

from ._base import _id, _Message, _uint
from ._bounds import MAX_INPUT_BYTES
from ._fields import check, check_type, get_bool, get_bytes, get_float, get_int
from ._terminal import check_size

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any, ClassVar, Self
else:
    from ._record import record as dataclass

#: The most input bytes in one ``input`` frame (see ``_bounds.py``).
MAX_INPUT_CHUNK = MAX_INPUT_BYTES


@dataclass(frozen=True, slots=True)
class Attach(_Message):
    """Attach to a running job's output and, where allowed, its input.

    Fields:
      job: the job's ID.
      position: where the output starts, as for :class:`Stream` (0: the first
        byte; a position received: right after it). None: a recent point, the
        first record of the last ATTACH_REPLAY bytes of output (the server's
        choice; docs/protocol.md), enough to repaint a shell's screen.
      input: True to send input: the owner (role control) and admin may;
        observe may not (``permission_denied``). The job must have been started
        with ``stdin`` or ``tty`` (else ``invalid_state``).
    """

    TYPE: ClassVar[str] = "attach"

    job: int
    position: int | None = None
    input: bool = False

    def __post_init__(self) -> None:
        _id("job", self.job)
        if self.position is not None:
            _id("position", self.position)
        check_type("input", self.input, bool)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "job": self.job}
        if self.position is not None:
            out["position"] = self.position
        if self.input:
            out["input"] = True
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "job"), get_int(m, "position", None),
                   get_bool(m, "input", False))


@dataclass(frozen=True, slots=True)
class Input(_Message):
    """Bytes for the job's stdin (or its terminal), sent during an attach with ``input``.

    Fields:
      data: 1 to MAX_INPUT_CHUNK bytes, written to the job exactly as they are.
    """

    TYPE: ClassVar[str] = "input"

    data: bytes

    def __post_init__(self) -> None:
        check_type("data", self.data, bytes)
        check(0 < len(self.data) <= MAX_INPUT_CHUNK,
              f"input data must be 1 to {MAX_INPUT_CHUNK} bytes, not {len(self.data)}")

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "data": self.data}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_bytes(m, "data"))


@dataclass(frozen=True, slots=True)
class InputEof(_Message):
    """The end of the input: closes the job's stdin pipe (every writer's); on a
    terminal, sends its end-of-file character (VEOF, normally Ctrl-D), as
    ``script`` does. No fields."""

    TYPE: ClassVar[str] = "eof"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Resize(_Message):
    """The client's terminal changed size: resize the job's terminal (which
    sends SIGWINCH to its foreground process group). Only with ``input``.

    Fields:
      rows, cols: 1 to MAX_TERMINAL_SIDE each.
    """

    TYPE: ClassVar[str] = "resize"

    rows: int
    cols: int

    def __post_init__(self) -> None:
        check_size(self.rows, self.cols)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "rows": self.rows, "cols": self.cols}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "rows"), get_int(m, "cols"))


@dataclass(frozen=True, slots=True)
class Detach(_Message):
    """End the attach, leaving the job running: the server answers ``end`` with
    the job's status now and the position of the last chunk sent. No fields."""

    TYPE: ClassVar[str] = "detach"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Resized(_Message):
    """The job's terminal was resized here: a server frame between the ``out``
    frames of a ``stream`` or ``output`` answer that asked for ``resizes``
    (minor 2), in the order of the log.

    Fields:
      rows, cols: the terminal's new size.
      position: the position just after this event in the log (resuming from
        it continues with what followed).
      time: when jobd resized the terminal, Unix seconds.
    """

    TYPE: ClassVar[str] = "resized"

    rows: int
    cols: int
    position: int
    time: float

    def __post_init__(self) -> None:
        check_size(self.rows, self.cols)
        _uint("position", self.position)
        check_type("time", self.time, (int, float))
        object.__setattr__(self, "time", float(self.time))

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "rows": self.rows, "cols": self.cols,
                "position": self.position, "time": self.time}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Self:
        return cls(get_int(m, "rows"), get_int(m, "cols"), get_int(m, "position"),
                   get_float(m, "time"))


#: The frames a client sends while an attach runs.
ATTACH_FRAMES = frozenset({Input.TYPE, InputEof.TYPE, Resize.TYPE, Detach.TYPE})

__all__ = ["ATTACH_FRAMES", "MAX_INPUT_CHUNK", "Attach", "Detach", "Input", "InputEof",
           "Resize", "Resized"]
