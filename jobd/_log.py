"""jobd's event log: one line per event on stderr, as text or JSON lines.

Text lines look like::

    2026-11-23T13:40:00.123Z info job-started id=4 owner=alice pid=812 argv="sleep 10"

JSON lines carry the same fields: ``{"ts": ..., "level": ..., "event": ..., ...}``.
Every event names who, what and why; docs/operations.md lists them all.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import trio

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _timestamp(now: float) -> str:
    ms = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"


def format_fields(fields: Mapping[str, Any]) -> list[str]:
    """``key=value`` words of a text line, None values left out."""
    return [f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None]


#: Characters that end or forge a line, or drive a terminal, when written raw:
#: C0 controls (NUL, ESC, CR, LF...), DEL, the C1 controls (CSI U+009B...), the
#: Unicode line and paragraph separators, lone surrogates (undecodable bytes of an
#: argv), and the format characters (Unicode Cf: the bidirectional overrides and
#: isolates that make a line read differently than it is, zero-width ones). The
#: text format escapes them all.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f"
                     "\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff"
                     "\ufeff\ufff9-\ufffb]")
#: What else forces a value into quotes (it would split the key=value syntax).
_QUOTE = re.compile('[ "=\\\\]')


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


def _text_value(value: Any) -> str:
    """A value as the text format writes it: bare if that is unambiguous, else a
    JSON string literal, with every control character escaped (``\\u001b``)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or _QUOTE.search(text) or _UNSAFE.search(text):
        # JSON escapes C0 controls itself; the others it leaves raw.
        return _UNSAFE.sub(_escape, json.dumps(text, ensure_ascii=False))
    return text


class EventLog:
    def __init__(self, fmt: str = "text", level: str = "info", stream: TextIO | None = None):
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown log format {fmt!r}")
        self._json = fmt == "json"
        self._min = LEVELS[level]
        self._stream = stream
        #: Also called with each event logged (event, level, fields): the telemetry's
        #: log records (jobd._telemetry). None: the event goes to the stream only.
        self.sink: Callable[[str, str, Mapping[str, Any]], None] | None = None
        #: While write_batches() runs: the lines the event loop's thread logged
        #: since the last write, and the thread's ident.
        self._batch: list[str] | None = None
        self._batch_thread = 0
        self._ready: trio.Event | None = None

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        if LEVELS[level] < self._min:
            return
        if self.sink is not None:
            self.sink(event, level, fields)
        now = time.time()
        if self._json:
            record = {"ts": _timestamp(now), "level": level, "event": event}
            record.update(fields)
            line = json.dumps(record, default=str)
        else:
            line = " ".join([_timestamp(now), level, event, *format_fields(fields)])
        batch = self._batch
        if batch is not None and threading.get_ident() == self._batch_thread:
            batch.append(line + "\n")
            assert self._ready is not None
            self._ready.set()
            return
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must never take the daemon down.
            pass

    async def write_batches(self) -> None:
        """Write the lines the event loop logs once per turn of the loop, in one write.

        Run as a task of the daemon's (until cancelled). Meanwhile a line logged
        in the event loop's thread is queued, and this task writes every queued
        line in one ``write`` after the loop's other ready tasks have run: a
        start storm logs two lines per job, and a write per line (each one
        waking whoever reads stderr) was a fifth of the loop's time (issue 26).
        Lines keep their order and their timestamps (taken when logged); lines
        from other threads are written at once. Cancelled, it writes what is
        left; a SIGKILL loses at most the lines of the current turn.
        """
        self._batch, self._batch_thread = [], threading.get_ident()
        try:
            while True:
                self._ready = trio.Event()
                await self._ready.wait()
                # One turn more: the tasks woken with this one may log too.
                await trio.lowlevel.checkpoint()
                lines, self._batch = self._batch, []
                self._write("".join(lines))
        finally:
            lines, self._batch = self._batch or [], None
            if lines:
                self._write("".join(lines))

    def info(self, event: str, **fields: Any) -> None:
        self.event(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event(event, "error", **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self.event(event, "debug", **fields)


class EventLogHandler(logging.Handler):
    """Routes the engine's stdlib ``logging`` records into the event log, so
    jobd writes one format only: event ``engine`` with the message."""

    def __init__(self, log: EventLog):
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        level = level if level in LEVELS else ("error" if record.levelno >= 40 else "info")
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        self._log.event("engine", level, message=message)


def route_engine_logs(log: EventLog) -> None:
    logger = logging.getLogger("jobd")
    logger.handlers[:] = [EventLogHandler(log)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
