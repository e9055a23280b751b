"""A job's terminal: the size and type of the pseudo-terminal it runs on (minor 2)."""

from __future__ import annotations

from ._fields import check, check_type, get_int, get_str

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from ._record import record as dataclass

#: The largest row or column count: the kernel's ``struct winsize`` holds 16 bits.
MAX_TERMINAL_SIDE = 65535
#: The longest ``term`` (a terminfo name such as ``xterm-256color``; ncurses caps
#: names at 32 characters, this leaves room).
MAX_TERM_NAME = 64


def check_size(rows: object, cols: object) -> None:
    """Rows and columns: integers from 1 to MAX_TERMINAL_SIDE."""
    for name, value in (("rows", rows), ("cols", cols)):
        check_type(name, value, int)
        assert isinstance(value, int)
        check(1 <= value <= MAX_TERMINAL_SIDE,
              f"{name} must be from 1 to {MAX_TERMINAL_SIDE}, not {value}")


@dataclass(frozen=True, slots=True)
class Terminal:
    """A pseudo-terminal for a job (``start``'s ``tty``; a status's ``tty``).

    Fields:
      rows, cols: its size, 1 to MAX_TERMINAL_SIDE each.
      term: the job's ``TERM`` (letters, digits and ``.+-_``, at most
        MAX_TERM_NAME characters); empty: ``TERM`` is left as the environment
        has it.
    """

    rows: int = 24
    cols: int = 80
    term: str = ""

    def __post_init__(self) -> None:
        check_size(self.rows, self.cols)
        check_type("term", self.term, str)
        check(len(self.term) <= MAX_TERM_NAME,
              f"term must be at most {MAX_TERM_NAME} characters")
        check(all(c.isascii() and (c.isalnum() or c in ".+-_") for c in self.term),
              "term may hold only letters, digits and . + - _")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "cols": self.cols}
        if self.term:
            out["term"] = self.term
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Terminal:
        return cls(get_int(m, "rows"), get_int(m, "cols"), get_str(m, "term", ""))


__all__ = ["MAX_TERMINAL_SIDE", "MAX_TERM_NAME", "Terminal", "check_size"]
