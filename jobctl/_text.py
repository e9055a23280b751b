"""What jobctl prints for people: escaped text, times, durations, tables.

Everything a job or a peer chose (argv, owners, error texts from the server)
passes through :func:`escape` or :func:`quote_argv` before it reaches a
terminal, as ``ps``, systemd and OpenSSH do: a control character could
otherwise clear the screen, retitle the window, or (a newline in a CN) forge a
row of ``list``. ``--json`` output is exact instead (JSON escapes by itself),
and ``stream``/``output`` write the job's own bytes untouched.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence

import protocol as p

#: What is never printed raw: C0 and C1 controls and DEL, the Unicode line and
#: paragraph separators, the bidirectional overrides and isolates (which can
#: reorder what a reader sees, "Trojan Source"), and the lone surrogates that
#: stand for bytes that were not UTF-8.
_UNSAFE = ("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
           "\u2066-\u2069\udc80-\udcff]")
_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f",
          "\r": "\\r", "\x1b": "\\e"}
#: A word the shell takes as it is, needing no quotes.
_PLAIN = r"[\w@%+=:,./-]+"


@functools.cache
def _rx(pattern: str) -> re.Pattern[str]:
    """Compiled on first use: most runs of jobctl print nothing that needs it."""
    return re.compile(pattern, re.ASCII if pattern is _PLAIN else 0)


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character as a C-style escape (``\\n``, ``\\e``, ``\\x9b``)."""
    if text.isprintable():  # every unsafe character is unprintable: the common case, fast
        return text
    return _rx(_UNSAFE).sub(_escape_char, text)


def quote_arg(arg: bytes | str) -> str:
    """One argument as a shell would need it, safe to print.

    Plain words stay as they are, others are single-quoted (as ``shlex.quote``
    does), and a word with an unsafe character or bytes that are not UTF-8 is
    written in bash's ``$'...'`` form, so that the result is unambiguous and
    can be pasted back into a shell.
    """
    text = arg.decode("utf-8", "surrogateescape") if isinstance(arg, bytes) else arg
    if text and _rx(_PLAIN).fullmatch(text):
        return text
    if text.isprintable() or not _rx(_UNSAFE).search(text):
        return "'" + text.replace("'", "'\"'\"'") + "'"
    inner = text.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + escape(inner) + "'"


def quote_argv(argv: Sequence[bytes | str]) -> str:
    return " ".join(quote_arg(a) for a in argv)


def describe(status: p.JobStatus) -> str:
    """The one-line status (SPEC §2), with the server's error text escaped."""
    return escape(status.describe())


def duration(seconds: float) -> str:
    """``0.3s``, ``13s``, ``2m13s``, ``3h05m``, ``2d04h``: two units at most, as people
    read them (tenths below 10 s)."""
    if seconds < 9.95:  # a short job: 0.3s, not 0s (and never "10.0s")
        return f"{max(0.0, seconds):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def run_time(status: p.JobStatus, now: float) -> str:
    """How long the job ran (so far); ``-`` if it never started."""
    if status.started is None:
        return "-"
    end = status.ended if status.ended is not None else now
    return duration(end - status.started)


def clock(when: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for none."""
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def size(value: int) -> str:
    """Bytes in binary units, as the options take them (``256M``, ``1.5G``)."""
    amount = float(value)
    for unit in ("", "K", "M", "G", "T"):
        if amount < 1024 or unit == "T":
            break
        amount /= 1024
    if unit == "":
        return f"{value}B"
    return f"{amount:.0f}{unit}" if amount == int(amount) else f"{amount:.1f}{unit}"


def table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None) -> list[str]:
    """Rows as lines: aligned columns with a header (for a terminal), else
    tab-separated with none (for scripts: ``cut -f``). The last column is never
    padded."""
    if header is None:
        return ["\t".join(row) for row in rows]
    every = [header, *rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(header) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
            for row in every]


def labels_text(labels: Sequence[tuple[str, str]]) -> str:
    """``key=value,key2=value2`` (escaped), ``-`` for none."""
    return ",".join(f"{escape(k)}={escape(v)}" for k, v in labels) or "-"


#: ``list``'s columns (``--format``): name -> (header, cell of a status at ``now``).
COLUMNS: dict[str, tuple[str, Callable[[p.JobStatus, float], str]]] = {
    "id": ("ID", lambda s, now: str(s.id)),
    "owner": ("OWNER", lambda s, now: escape(s.owner)),
    "status": ("STATUS", lambda s, now: describe(s)),
    "state": ("STATE", lambda s, now: s.state.value),
    "created": ("CREATED", lambda s, now: clock(s.created)),
    "started": ("STARTED", lambda s, now: clock(s.started)),
    "ended": ("ENDED", lambda s, now: clock(s.ended)),
    "duration": ("DURATION", lambda s, now: run_time(s, now)),
    "pid": ("PID", lambda s, now: "-" if s.pid is None else str(s.pid)),
    "exit": ("EXIT", lambda s, now: "-" if s.running else str(exit_code(s))),
    "labels": ("LABELS", lambda s, now: labels_text(s.labels)),
    "command": ("COMMAND", lambda s, now: quote_argv(s.argv)),
}
#: What ``list`` shows by default (scripts: ``cut -f1`` is the ID, ``-f6`` the command;
#: labels only when a job listed has some).
DEFAULT_COLUMNS = ("id", "owner", "status", "created", "duration", "command", "labels")


def exit_code(status: p.JobStatus) -> int:
    from ._core import exit_status

    return exit_status(status)


def list_row(status: p.JobStatus, now: float, columns: Sequence[str]) -> list[str]:
    return [COLUMNS[c][1](status, now) for c in columns]


def status_long(status: p.JobStatus, now: float) -> list[str]:
    """Every field of a status, one per line, aligned (``status -v``)."""
    limits = status.limits
    lines: list[tuple[str, str]] = [
        ("id", str(status.id)),
        ("owner", escape(status.owner)),
        ("command", quote_argv(status.argv)),
        ("status", describe(status)),
        ("pid", "-" if status.pid is None else str(status.pid)),
        ("created", clock(status.created)),
        ("started", clock(status.started)),
        ("ended", clock(status.ended)),
        ("duration", run_time(status, now)),
        ("limits", "none" if limits is None or limits.is_empty() else limits_text(limits)),
        # 0: measured from after it ended (a job of a few ms, moved into its cgroup late)
        ("peak memory", "-" if not status.peak_memory else size(status.peak_memory)),
        ("cpu time", "-" if status.cpu_time is None else f"{status.cpu_time:.3f}s"),
        ("labels", labels_text(status.labels)),
        ("output", f"{status.output_bytes} bytes kept"),
        ("dropped", f"{status.dropped_bytes} bytes"),
    ]
    width = max(len(name) for name, _ in lines) + 1
    return [f"{name + ':':<{width}} {value}" for name, value in lines]


def limits_text(limits: p.Limits) -> str:
    parts = []
    if limits.memory is not None:
        parts.append(f"memory {size(limits.memory)}")
    if limits.cpus is not None:
        parts.append(f"cpus {limits.cpus:g}")
    if limits.pids is not None:
        parts.append(f"pids {limits.pids}")
    for name, pairs in (("io read", limits.io_read_bps), ("io write", limits.io_write_bps)):
        parts.extend(f"{name} {escape(dev)} {size(rate)}/s" for dev, rate in pairs)
    if limits.isolate:
        parts.append("isolate " + ",".join(limits.isolate))
    return ", ".join(parts)


__all__ = ["COLUMNS", "DEFAULT_COLUMNS", "clock", "describe", "duration", "escape",
           "labels_text", "list_row", "quote_arg", "quote_argv", "run_time", "size",
           "status_long", "table"]
