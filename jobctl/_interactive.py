"""Interactive jobs on the command line: ``run -i/-t``, ``start -i/-t``,
``attach``, and ``stream --asciicast``.

Theory of operation
-------------------

One loop (:func:`interact`) serves an attach: ``select`` on the connection's
socket, our input (stdin, while it has not ended and the attach may type) and
a wakeup pipe that every signal we handle writes its number to
(``signal.set_wakeup_fd``). Output is written as it comes; input is read up
to ``MAX_INPUT_CHUNK`` bytes at a time and sent as one ``input`` frame, so a
job that reads slowly makes our send wait, and we read no more of our stdin
meanwhile (backpressure from the job to whatever feeds us). Our EOF becomes
an ``eof`` frame.

On a terminal job with our stdin a terminal (``-t``; ``attach`` to a
terminal job) our terminal is put in raw mode (:class:`RawMode`) so that every
key, Ctrl-C (0x03) and Ctrl-Z included, travels as a byte to the job's pty,
whose line discipline turns it into SIGINT or SIGTSTP for the job's
foreground process group, never for jobctl. The terminal is restored on every
way out: the end of the job, detaching, an error (``finally``), SIGTERM and
SIGHUP (handled in the loop, then restored), and around a stop (SIGTSTP sent
with ``kill``: restored, stopped, raw again on SIGCONT). SIGWINCH sends our
new size as a ``resize`` frame.

The detach sequence (default ``ctrl-],d``; ``--detach-keys`` or
``$JOBCTL_DETACH_KEYS``, as docker's ``--detach-keys``) is recognised in our
input: the attach ends with ``detach``, the job runs on, and jobctl says how
to come back. A prefix of it that is not followed by the rest goes to the job
as typed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterator
from typing import Any

import protocol as p

from . import _core as core
from ._blocking import BlockingAttach
from ._errors import ConfigError

#: The default detach sequence: Ctrl-] (telnet's escape) then d.
DEFAULT_DETACH_KEYS = "ctrl-],d"
#: Signals the loop handles (through the wakeup pipe).
_HANDLED = (signal.SIGWINCH, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP,
            signal.SIGCONT)


def parse_detach_keys(spec: str) -> bytes:
    """``ctrl-],d`` -> ``b"\\x1dd"``: comma-separated keys, each one character or
    ``ctrl-X`` (X a letter or one of ``@[\\]^_``). Empty: no detach sequence."""
    keys = bytearray()
    for key in spec.split(",") if spec else ():
        if len(key) == 1 and key.isascii() and key.isprintable():
            keys.append(ord(key))
        elif key.lower().startswith("ctrl-") and len(key) == 6:
            char = key[5].upper()
            if not ("@" <= char <= "_"):
                raise ConfigError(f"--detach-keys: no such key {key!r}")
            keys.append(ord(char) - 64)
        else:
            raise ConfigError(f"--detach-keys: expected keys like ctrl-],d, not {key!r}")
    return bytes(keys)


def describe_keys(keys: bytes) -> str:
    return " then ".join(f"Ctrl-{chr(k + 64)}" if k < 32 else chr(k) for k in keys)


def terminal_size(fd: int = 1) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd`` (or stdin, stderr); 24x80 if none."""
    for candidate in (fd, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(candidate)
            if size.lines > 0 and size.columns > 0:
                return min(size.lines, p.MAX_TERMINAL_SIDE), min(size.columns,
                                                                  p.MAX_TERMINAL_SIDE)
    return 24, 80


def local_terminal() -> p.Terminal:
    """A terminal like ours: our size and ``$TERM`` (if it is a valid name)."""
    rows, cols = terminal_size()
    term = os.environ.get("TERM", "")
    try:
        return p.Terminal(rows, cols, term)
    except p.FieldError:
        return p.Terminal(rows, cols)


class RawMode:
    """Our terminal in raw mode while entered; restored on exit, and around stops."""

    def __init__(self, fd: int) -> None:
        import termios

        self.fd = fd
        self._saved: list[Any] = termios.tcgetattr(fd)
        self.active = False

    def enter(self) -> None:
        import termios
        import tty

        tty.setraw(self.fd, termios.TCSADRAIN)  # not TCSAFLUSH: keys typed ahead count
        self.active = True

    def restore(self) -> None:
        import termios

        if self.active:
            with contextlib.suppress(OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self.active = False


@contextlib.contextmanager
def _signals() -> Iterator[int]:
    """The read end of a pipe that each handled signal writes its number to."""
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in _HANDLED}
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield read
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read)
        os.close(write)


class Outcome:
    """How an interactive session ended."""

    def __init__(self, end: p.End, detached: bool, signal_number: int | None = None) -> None:
        self.end = end
        self.detached = detached  # by the detach keys or a signal: the job runs on
        self.signal = signal_number  # the signal that made us detach, if one did


def interact(session: BlockingAttach, *, input_fd: int | None, raw: RawMode | None,
             detach_keys: bytes, resize: bool) -> Outcome:
    """Serve ``session`` until its end (see the module's doc). ``input_fd``: where
    our input comes from (None: read-only); ``raw``: our terminal, to put in raw
    mode; ``resize``: send our size on SIGWINCH (and once at the start)."""
    matched = 0  # bytes of the detach sequence typed so far
    by_signal: int | None = None
    with _signals() as wakeup:
        if raw is not None:
            raw.enter()
        try:
            if resize:
                session.resize(*terminal_size())
            while session.end is None:
                for event in session.poll():
                    if isinstance(event, p.OutputChunk):
                        core.write_all(1 if raw is not None else event.fd, event.data)
                if session.end is not None:
                    break
                watched = [session.fileno(), wakeup]
                if input_fd is not None:
                    watched.append(input_fd)
                ready, _, _ = select.select(watched, [], [], session.liveness)
                if not ready:  # not even a tick: the server or the path is gone
                    raise core.silent(session.liveness or 0.0)
                if wakeup in ready:
                    for number in os.read(wakeup, 512):
                        by_signal = _on_signal(number, session, raw, resize) or by_signal
                if input_fd is not None and input_fd in ready:
                    data = _read_input(input_fd, raw is None)
                    if not data:
                        session.close_input()
                        input_fd = None
                        continue
                    if detach_keys:
                        data, matched, detach = _scan(data, detach_keys, matched)
                        if data:
                            session.send(data)
                        if detach:
                            session.detach()
                            input_fd = None
                    else:
                        session.send(data)
        finally:
            if raw is not None:
                raw.restore()
    assert session.end is not None
    detached = session.end.status.running
    return Outcome(session.end, detached, by_signal if detached else None)


def _read_input(fd: int, bulk: bool) -> bytes:
    """What ``fd`` has now, up to one input frame; ``bulk`` (not a person typing):
    more reads while more is ready at once, so that a pipe's 64 KiB reads travel
    as 256 KiB frames (fewer frames, fewer wakeups on both sides)."""
    data = os.read(fd, p.MAX_INPUT_CHUNK)
    if not bulk or not data:
        return data
    parts = [data]
    size = len(data)
    while size < p.MAX_INPUT_CHUNK and select.select([fd], [], [], 0)[0]:
        more = os.read(fd, p.MAX_INPUT_CHUNK - size)
        if not more:
            break  # the end: the next read says so again
        parts.append(more)
        size += len(more)
    return b"".join(parts)


def _on_signal(number: int, session: BlockingAttach, raw: RawMode | None,
               resize: bool) -> int | None:
    """Carry out one signal; the signal's number if it ends the session (detach)."""
    if number == signal.SIGWINCH:
        if resize:
            session.resize(*terminal_size())
    elif number == signal.SIGTSTP:  # only by kill: in raw mode Ctrl-Z goes to the job
        if raw is not None:
            raw.restore()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, lambda signum, frame: None)
        if raw is not None:
            raw.enter()
        if resize:
            session.resize(*terminal_size())
    elif number == signal.SIGCONT:
        if raw is not None and raw.active:
            raw.enter()  # the shell may have reset our terminal while we were stopped
    elif number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        session.detach()
        return number
    return None


def _scan(data: bytes, keys: bytes, matched: int) -> tuple[bytes, int, bool]:
    """Find the detach sequence in typed ``data``, ``matched`` of its bytes typed
    before. Returns (what goes to the job, how much of the sequence is pending,
    whether it is complete). Bytes after a complete sequence are dropped."""
    out = bytearray()
    for byte in data:
        if byte == keys[matched]:
            matched += 1
            if matched == len(keys):
                return bytes(out), 0, True
            continue
        if matched:  # not the sequence after all: what was held back goes on
            out += keys[:matched]
            matched = 0
            if byte == keys[0]:
                matched = 1
                continue
        out.append(byte)
    return bytes(out), matched, False


def say(message: str) -> None:
    """One line on stderr, at the start of a line (raw output may have left the
    cursor anywhere)."""
    sys.stderr.write(f"\r\n{message}\n" if sys.stderr.isatty() else f"{message}\n")
    sys.stderr.flush()


__all__ = ["DEFAULT_DETACH_KEYS", "Outcome", "RawMode", "describe_keys", "interact",
           "local_terminal", "parse_detach_keys", "say", "terminal_size"]
