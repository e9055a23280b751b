"""The commands that follow jobs: ``run``, ``stream``/``output`` and ``wait``.

``run`` and Ctrl-C. While ``run`` follows its job, SIGINT only writes to a
wakeup pipe (``signal.set_wakeup_fd``, with a handler that does nothing), and
the blocking client waits for the server with ``select`` on its socket and
that pipe (``TLSChannel.wakeup``). So a Ctrl-C is handled between two reads,
never in the middle of one: the connection stays intact whatever is decided,
and following simply goes on after a "no". What a Ctrl-C does:

- ``--detach-on-interrupt``, and the default when stdin or stderr is not a
  terminal (scripts): leave the job running, say its ID on stderr, exit 130;
- ``--stop-on-interrupt``: stop the job on a second connection, keep
  following to its end, exit with its status (130 for the SIGINT that ended
  it);
- on a terminal, by default: ask once (``stop job 4? [y/N]``); yes stops as
  above, no keeps following; a further Ctrl-C, also at the question,
  detaches;
- started with SIGINT ignored (a background job of a script): nothing, as for
  every other command; the inherited "ignore" stays.

``--tail N`` is done by the client: it reads the output that exists now
(``output``), keeps only the last N lines, then follows from the position
that answer ended at, so nothing is lost or repeated between the two. The
cost is reading the whole log once over the connection; jobd's log has no
line index to seek back from, and the common case (a build log, a service's
last minutes) is small. Memory holds the N lines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import protocol as p

from . import _core as core
from . import _text as text
from ._blocking import BlockingClient
from ._context import Context, print_json
from ._errors import ConfigError, JobctlError, ServerError, WaitTimeout


class Detached(Exception):
    """A Ctrl-C that leaves the job running."""


# -- writing output ------------------------------------------------------------


def _stamp(when: float) -> bytes:
    """RFC 3339 UTC with microseconds, as ``docker logs -t`` writes it."""
    micros = round(when * 1e6)
    secs, frac = divmod(micros, 1_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
            + f".{frac:06d}Z ").encode()


class Writer:
    """Writes chunks to stdout/stderr, each line prefixed with its time if asked.

    A line's time is the time jobd read its first byte. A server before
    protocol 1.1 sends no times: the time the chunk arrived stands in.
    """

    def __init__(self, timestamps: bool, *, only_fd: int | None = None,
                 since: float | None = None) -> None:
        self.timestamps = timestamps
        #: ``--stdout``/``--stderr``: the one fd written; ``--since``: the first time.
        self.only_fd = only_fd
        self.since = since
        self._at_line_start = {1: True, 2: True}

    @property
    def wants_time(self) -> bool:
        """Ask the server for each chunk's time (one chunk per record)."""
        return self.timestamps or self.since is not None

    def wanted(self, event: p.OutputChunk) -> bool:
        if self.only_fd is not None and event.fd != self.only_fd:
            return False
        # A record's time is when jobd read it; with since, a chunk has its record's.
        return self.since is None or (event.time is not None and event.time >= self.since)

    def write(self, fd: int, data: bytes, when: float | None) -> None:
        if not self.timestamps:
            core.write_all(fd, data)
            return
        prefix = _stamp(time.time() if when is None else when)
        out = bytearray()
        for line in data.splitlines(keepends=True):
            if self._at_line_start[fd]:
                out += prefix
            out += line
            self._at_line_start[fd] = line.endswith(b"\n")
        core.write_all(fd, out)

    def follow(self, events: Iterable[p.OutputChunk | p.End]) -> p.End:
        end: p.End | None = None
        for event in events:
            if isinstance(event, p.OutputChunk):
                if self.wanted(event):
                    self.write(event.fd, event.data, event.time)
            else:
                end = event
        assert end is not None
        return end


def _truncated(end: p.End) -> None:
    if end.status.dropped_bytes:
        print(f"jobctl: output truncated: {end.status.dropped_bytes} bytes dropped by the server",
              file=sys.stderr)


def _tail(client: BlockingClient, job: int, count: int, writer: Writer) -> p.End:
    """Write the last ``count`` lines of the output that exists now."""
    lines: deque[tuple[int, bytes, float | None]] = deque(maxlen=count or 1)
    partial: dict[int, tuple[bytearray, float | None]] = {}
    end: p.End | None = None
    for event in client.output(job, timestamps=writer.wants_time):
        if not isinstance(event, p.OutputChunk):
            end = event
            continue
        if not writer.wanted(event):
            continue
        for line in event.data.splitlines(keepends=True):
            held = partial.pop(event.fd, None)
            line_bytes: bytes
            if held is not None:
                held[0].extend(line)
                line_bytes, when = bytes(held[0]), held[1]
            else:
                line_bytes, when = line, event.time
            if line.endswith(b"\n"):
                lines.append((event.fd, line_bytes, when))
            else:
                partial[event.fd] = (bytearray(line_bytes), when)
    assert end is not None
    for fd, (rest, when) in partial.items():
        lines.append((fd, bytes(rest), when))
    if count:
        for fd, data, when in lines:
            writer.write(fd, data, when)
    return end


def _on_reconnect(client: BlockingClient) -> None:
    """Say on a terminal when the connection is lost and when it is back (never
    into a file or pipe: stderr may be carrying the job's own stderr)."""
    if sys.stderr.isatty():
        client.on_reconnect = lambda line: print(f"jobctl: {text.escape(line)}",
                                                 file=sys.stderr, flush=True)


def stream(ns: argparse.Namespace, ctx: Context, *, follow: bool) -> int:
    if ns.asciicast:
        if ns.tail is not None or ns.timestamps:
            raise ConfigError("--asciicast writes the whole output, with its own times: "
                              "not with --tail or --timestamps")
        return asciicast(ns, ctx, follow=follow)
    client = ctx.client
    _on_reconnect(client)
    writer = Writer(ns.timestamps, only_fd=ns.only_fd, since=ns.since)
    if ns.since is not None:  # the records' times: protocol 1.1
        core.require_minor(client.welcome, core.LIST_FILTERS_MINOR, "--since")
    position = 0
    end: p.End | None = None
    if ns.tail is not None:
        end = _tail(client, ns.id, ns.tail, writer)
        position = end.position
    if follow:
        end = writer.follow(client.stream(ns.id, position, timestamps=writer.wants_time,
                                          reconnect=ns.reconnect_timeout))
    elif end is None:
        end = writer.follow(client.output(ns.id, timestamps=writer.wants_time))
    _truncated(end)
    return 0


# -- wait ----------------------------------------------------------------------


def wait(ns: argparse.Namespace, ctx: Context) -> int:
    deadline = None if ns.timeout is None else time.monotonic() + ns.timeout
    first: p.JobStatus | None = None
    client = ctx.client
    _on_reconnect(client)
    for job in ns.ids:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            status = client.wait(job, timeout=remaining, reconnect=ns.reconnect_timeout)
        except WaitTimeout:
            print(f"jobctl: timed out after {ns.timeout:g}s waiting for job {job}",
                  file=sys.stderr)
            return 124
        if ns.json:
            print_json(status.to_json())
        else:
            print(text.describe(status), flush=True)
        first = first or status
    assert first is not None
    return core.exit_status(first)


# -- run -----------------------------------------------------------------------


def run(ns: argparse.Namespace, ctx: Context, start: dict[str, Any]) -> int:
    client = ctx.client
    status = client.start(ns.words, **start)
    if status.state is p.JobState.ERROR:
        print(text.describe(status), file=sys.stderr)
        return 1
    if start.get("stdin"):
        return _interactive(ns, ctx, status, position=0, typing=True)
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    policy = ns.on_interrupt or ("ask" if interactive else "detach")
    interrupt = _Interrupt(ctx, status.id, policy)
    writer = Writer(ns.timestamps)
    _on_reconnect(client)
    try:
        with interrupt.installed(client):
            end = writer.follow(client.stream(status.id, timestamps=ns.timestamps,
                                              reconnect=ns.reconnect_timeout))
    except Detached:
        print(f"\njobctl: detached: job {status.id} keeps running "
              f"(jobctl stream {status.id}; jobctl stop {status.id})", file=sys.stderr)
        return 130
    except JobctlError as exc:  # the connection was lost: the job may well run on
        print(f"{text.escape(str(exc))} (following job {status.id}: jobctl status "
              f"{status.id})", file=sys.stderr)
        return exc.exit_status
    _truncated(end)
    if end.status.state in (p.JobState.ERROR, p.JobState.KILLED):
        # As a shell says "Killed": an exit status alone does not tell an OOM kill.
        print(text.describe(end.status), file=sys.stderr)
    elif end.status.state is p.JobState.STOPPED and not interrupt.stopping:
        print(f"jobctl: job {status.id} stopped{_stopped_by(client, status.id)}",
              file=sys.stderr)
    return core.exit_status(end.status)


def _stopped_by(client: BlockingClient, job: int) -> str:
    """Why a job ``run`` did not stop itself was stopped: jobd shutting down
    sends its goodbye (``unavailable``) after the stream's end, so the next
    request on this connection gets it at once, or finds the connection closed."""
    try:
        client.status(job)
    except JobctlError as exc:
        if isinstance(exc, ServerError) and exc.code is not p.ErrorCode.UNAVAILABLE:
            return ""
        return ": the server is shutting down"
    return " (by a stop request)"


class _Interrupt:
    """What a Ctrl-C does while ``run`` follows its job (see the module's doc)."""

    def __init__(self, ctx: Context, job: int, policy: str) -> None:
        self.ctx = ctx
        self.job = job
        self.policy = policy
        self.asked = False
        self.stopping = False
        self._wakeup = -1

    @contextlib.contextmanager
    def installed(self, client: BlockingClient) -> Iterator[None]:
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # Started with SIGINT ignored (`jobctl run ... &` in a script): ignore it,
            # as stream and wait do, rather than detach on a Ctrl-C meant for others.
            yield
            return
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = read
        client.set_wakeup(read, self.handle)
        try:
            yield
        finally:
            client.set_wakeup(None, None)
            signal.set_wakeup_fd(previous_fd)
            signal.signal(signal.SIGINT, previous)
            os.close(read)
            os.close(write)

    def handle(self) -> None:
        if self.policy == "detach" or self.stopping or (self.policy == "ask" and self.asked):
            raise Detached
        if self.policy == "ask":
            self.asked = True
            if not self._ask():
                print("jobctl: following on (Ctrl-C again detaches)", file=sys.stderr)
                return
        self._stop()

    def _ask(self) -> bool:
        import select

        print(f"\njobctl: stop job {self.job}? [y/N] (Ctrl-C again: detach) ", end="",
              file=sys.stderr, flush=True)
        answer = b""
        while not answer.endswith(b"\n"):
            ready, _, _ = select.select([sys.stdin.fileno(), self._wakeup], [], [])
            if self._wakeup in ready:
                raise Detached
            chunk = os.read(sys.stdin.fileno(), 256)
            if not chunk:
                break
            answer += chunk
        return answer.strip().lower() in (b"y", b"yes")

    def _stop(self) -> None:
        self.stopping = True
        print(f"\njobctl: stopping job {self.job}…", file=sys.stderr, flush=True)
        try:
            with self.ctx.connect() as other:
                other.stop(self.job)
        except JobctlError as exc:  # it ended meanwhile, or the stop failed: say so, go on
            print(f"jobctl: {text.escape(str(exc))}", file=sys.stderr)
        # Ctrl-C pressed while the stop ran: the job is gone, nothing to detach from.
        with contextlib.suppress(OSError):
            while os.read(self._wakeup, 512):
                pass


# -- interactive jobs: run -i/-t, attach -----------------------------------------------


def attach(ns: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client
    core.require_minor(client.welcome, core.INTERACTIVE_MINOR, "attach")
    status = client.status(ns.id)
    typing = (not ns.read_only and client.role != "observe" and status.stdin
              and status.running)
    return _interactive(ns, ctx, status, position=0 if ns.all else None, typing=typing)


def _interactive(ns: argparse.Namespace, ctx: Context, status: p.JobStatus, *,
                 position: int | None, typing: bool) -> int:
    from ._interactive import (
        DEFAULT_DETACH_KEYS,
        RawMode,
        describe_keys,
        interact,
        parse_detach_keys,
        say,
    )

    spec = ns.detach_keys
    if spec is None:
        spec = os.environ.get("JOBCTL_DETACH_KEYS", DEFAULT_DETACH_KEYS)
    keys = parse_detach_keys(spec)
    terminal = status.tty is not None and sys.stdin.isatty()
    raw = RawMode(sys.stdin.fileno()) if terminal and typing else None
    if raw is not None and keys:
        say(f"jobctl: attached to job {status.id}; {describe_keys(keys)} detaches")
    session = ctx.client.attach(status.id, position, input=typing)
    try:
        outcome = interact(session, input_fd=sys.stdin.fileno() if typing else None,
                           raw=raw, detach_keys=keys if typing and terminal else b"",
                           resize=raw is not None)
    except JobctlError as exc:  # the connection was lost: the job may well run on
        print(f"{text.escape(str(exc))} (job {status.id}: jobctl attach {status.id})",
              file=sys.stderr)
        return exc.exit_status
    if outcome.detached:
        say(f"jobctl: detached: job {status.id} keeps running (jobctl attach {status.id}; "
            f"jobctl stop {status.id})")
        return 128 + outcome.signal if outcome.signal is not None else 0
    end = outcome.end
    _truncated(end)
    if end.status.state in (p.JobState.ERROR, p.JobState.KILLED):
        say(text.describe(end.status))
    return core.exit_status(end.status)


# -- asciicast -------------------------------------------------------------------------


def asciicast(ns: argparse.Namespace, ctx: Context, *, follow: bool) -> int:
    """asciicast v2: a JSON header line, then ``[seconds, "o", text]`` per record
    of output, timed from the job's start with the times jobd read it, and
    ``[seconds, "r", "COLSxROWS"]`` where the terminal was resized (jobd records
    each resize at its place in the log: protocol 1.2)."""
    import codecs
    import json

    client = ctx.client
    status = client.status(ns.id)
    rows, cols = (status.tty.rows, status.tty.cols) if status.tty is not None else (24, 80)
    header: dict[str, object] = {"version": 2, "width": cols, "height": rows,
                                 "title": text.quote_argv(status.argv)}
    start = status.started if status.started is not None else status.created
    header["timestamp"] = int(start)
    if status.tty is not None and status.tty.term:
        header["env"] = {"TERM": status.tty.term}
    out = sys.stdout
    out.write(json.dumps(header) + "\n")
    decoders = {1: codecs.getincrementaldecoder("utf-8")("replace"),
                2: codecs.getincrementaldecoder("utf-8")("replace")}
    events = (client.stream(ns.id, timestamps=True, resizes=True) if follow
              else client.output(ns.id, timestamps=True, resizes=True))
    end: p.End | None = None
    for event in events:
        if isinstance(event, p.End):
            end = event
            continue
        if isinstance(event, p.Resized):
            when = max(0.0, event.time - start)
            out.write(json.dumps([round(when, 6), "r", f"{event.cols}x{event.rows}"]) + "\n")
            continue
        chunk = decoders[event.fd].decode(event.data)
        if chunk:
            when = max(0.0, (event.time if event.time is not None else time.time()) - start)
            out.write(json.dumps([round(when, 6), "o", chunk]) + "\n")
            out.flush()
    assert end is not None
    _truncated(end)
    return 0
