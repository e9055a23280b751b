"""Many servers at once: :func:`fanout` (library) and ``jobctl -s GROUP ...``.

Theory of operation
-------------------
:func:`fanout` opens one connection per server, concurrently (at most
``max_concurrent`` at a time), runs the caller's ``work(client, target)`` on
each, and returns one :class:`Outcome` per server, in the order given. A
server that cannot be reached, refuses, or answers with an error gives an
Outcome with ``error`` set; it never cancels or delays the others, because
each server is its own task in one nursery and only ``JobctlError`` (the
expected failures) is caught per task. ``on_done`` is called as each server
finishes, so a caller can report progress as it happens.

The command line prints each server's output as it arrives, line by line,
prefixed with the server's name (colored on a terminal; ``--no-prefix``
drops it). A partial line is held until its newline (or until it reaches
LINE_LIMIT bytes, or the end): lines from two servers never interleave
inside a line. Errors are reported as each server finishes, except
connection failures, which are listed at the end. The exit status is the
highest of the servers' statuses (3 for an unreachable server; a job's own
status for ``run`` and ``wait``).

    async def work(client, target):
        return await client.status(7)

    for outcome in await jobctl.fanout(targets, work):
        print(outcome.target.name, outcome.value or outcome.error)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import trio

import protocol as p

from . import _core as core
from . import _text as text
from ._async import Client, connect
from ._context import filter_jobs, list_columns, list_filters
from ._errors import ConfigError, ConnectionFailed, JobctlError, WaitTimeout
from ._profiles import Target
from ._trust import Pinning

T = TypeVar("T")

#: Connections open at once: enough for a rack, few enough for one process's
#: file descriptors and for the servers' handshake load.
MAX_CONCURRENT = 64
#: A partial line longer than this is written as it is (with a newline): a
#: job that writes no newlines must not make jobctl hold its output forever.
LINE_LIMIT = 64 * 1024
#: With --json, ``run`` keeps this much of each server's output for its object
#: (stdout and stderr together); more is dropped and flagged.
JSON_OUTPUT_CAP = 1 << 20
#: What ``jobctl -s GROUP`` runs on each server.
GROUP_COMMANDS = ("start", "run", "status", "stop", "list", "wait", "delete", "stream",
                  "output")
#: ANSI colors for the name prefixes on a terminal, one per server in turn.
COLORS = (36, 33, 35, 32, 34, 31)


@dataclass
class Outcome(Generic[T]):
    """What one server gave: ``value`` (the work's result) or ``error``."""

    target: Target
    value: T | None = None
    error: JobctlError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def fanout(
    targets: Sequence[Target],
    work: Callable[[Client, Target], Awaitable[T]],
    *,
    max_concurrent: int = MAX_CONCURRENT,
    connect_timeout: float = core.CONNECT_TIMEOUT,
    on_done: Callable[[Outcome[T]], None] | None = None,
) -> list[Outcome[T]]:
    """Run ``work`` on every target over one connection each, concurrently."""
    outcomes: list[Outcome[T]] = [Outcome(t) for t in targets]
    limiter = trio.CapacityLimiter(max_concurrent)

    async def one(outcome: Outcome[T]) -> None:
        t = outcome.target
        async with limiter:
            try:
                async with connect_target(t, connect_timeout) as client:
                    outcome.value = await work(client, t)
            except JobctlError as exc:
                outcome.error = exc
        if on_done is not None:
            on_done(outcome)

    async with trio.open_nursery() as nursery:
        for outcome in outcomes:
            nursery.start_soon(one, outcome)
    return outcomes


def connect_target(t: Target, connect_timeout: float = core.CONNECT_TIMEOUT
                   ) -> contextlib.AbstractAsyncContextManager[Client]:
    """``jobctl.connect`` to one target (its CA, or its pin: trust on first use)."""
    pin = Pinning(t.address, t.port, accept_new=t.trust_on_first_use) if t.ca is None else None
    return connect(t.address, t.port, certificate=t.certificate, key=t.key, ca=t.ca,
                   server_name=t.server_name, pin=pin, connect_timeout=connect_timeout)


job_exit_status = core.exit_status  # SPEC §9, as `run` and `wait` exit on one server


# -- the command line ------------------------------------------------------------------


class Printer:
    """Writes lines prefixed with a server's name, whole lines only."""

    def __init__(self, names: Sequence[str], *, prefix: bool):
        width = max((len(n) for n in names), default=0)
        color = prefix and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.prefixes: dict[str, bytes] = {}
        for i, name in enumerate(names):
            text = f"{name}:".ljust(width + 1) + " " if prefix else ""
            if color and text:
                text = f"\x1b[{COLORS[i % len(COLORS)]}m{name}:\x1b[0m".ljust(
                    width + 10) + " "
            self.prefixes[name] = text.encode()
        self.partial: dict[tuple[str, int], bytearray] = {}

    def write(self, name: str, fd: int, data: bytes) -> None:
        buf = self.partial.setdefault((name, fd), bytearray())
        buf += data
        out = bytearray()
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) < LINE_LIMIT:
                    break
                end = LINE_LIMIT - 1
                out += self.prefixes[name] + buf[:end + 1] + b"\n"
            else:
                out += self.prefixes[name] + buf[:end + 1]
            del buf[:end + 1]
        if out:
            _write_all(fd, out)

    def line(self, name: str, text: str, fd: int = 1) -> None:
        self.write(name, fd, text.encode() + b"\n")

    def flush(self, name: str) -> None:
        for fd in (1, 2):
            buf = self.partial.pop((name, fd), None)
            if buf:
                _write_all(fd, self.prefixes[name] + bytes(buf) + b"\n")


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_cli(ns: argparse.Namespace, targets: Sequence[Target], command: list[str] | None,
            start: dict[str, Any], *, group: bool = True) -> int:
    """``jobctl -s GROUP COMMAND``: the command on every server of the group
    (``group`` False: without name prefixes)."""
    if ns.command not in GROUP_COMMANDS:
        raise ConfigError(f"{ns.command} is not supported with a group of servers "
                          f"(only {', '.join(GROUP_COMMANDS)})")
    # Refused rather than silently ignored.
    for option, flag in (("tail", "--tail"), ("timestamps", "--timestamps"),
                         ("long", "-v/--long"), ("interactive", "-i/--interactive"),
                         ("tty", "-t/--tty"), ("asciicast", "--asciicast")):
        if getattr(ns, option, None):
            raise ConfigError(f"{flag} is not supported with a group of servers")
    if ns.command in ("stream", "output") and ns.since is not None:
        raise ConfigError("--since is not supported with a group of servers")
    try:
        return trio.run(_run_cli, ns, targets, command, start, group and not ns.no_prefix)
    except BaseExceptionGroup as group_exc:
        # A Ctrl-C (exit 130; the jobs run on), or our stdout gone away (`jobctl -s all
        # run ... | head -1`: quietly), reach the command line as for one server.
        # Anything else is a bug: let it show.
        interrupted, rest = group_exc.split(KeyboardInterrupt)
        _broken, rest = rest.split(BrokenPipeError) if rest is not None else (None, None)
        if rest is not None:
            raise
        if interrupted is not None:
            raise KeyboardInterrupt from None
        raise BrokenPipeError from None


async def _run_cli(ns: argparse.Namespace, targets: Sequence[Target],
                   command: list[str] | None, start: dict[str, Any], prefix: bool) -> int:
    """``start``: the keyword arguments of ``client.start`` (limits, ...)."""
    import json

    printer = Printer([t.name for t in targets], prefix=prefix)
    what = ns.command
    #: run: the job each server started, until it ends (what Ctrl-C acts on)
    running: dict[str, tuple[Target, int]] = {}
    reconnect = getattr(ns, "reconnect_timeout", core.RECONNECT_TIMEOUT)

    async def work(client: Client, target: Target) -> tuple[Any, ...]:
        name = target.name
        if what in ("start", "run"):
            assert command is not None
            status = await client.start(command, **start)
            if what == "start" and not ns.json:
                printer.line(name, str(status.id))  # also for a job that could not run
            if status.state is p.JobState.ERROR:
                return 1, status  # on_done writes the error
            if what == "start":
                return 0, status
            running[name] = (target, status.id)
            if not ns.json:
                end = await _follow(client, status.id, name, printer, reconnect=reconnect)
                del running[name]
                return job_exit_status(end), end
            kept: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
            end = await _follow(client, status.id, name, printer, keep=kept,
                                reconnect=reconnect)
            del running[name]
            return job_exit_status(end), end, _kept_json(kept)
        if what == "wait":  # every job named, in order; the first one's status
            ends = []
            with trio.move_on_after(ns.timeout if ns.timeout is not None else math.inf) \
                    as scope:
                for job in ns.ids:
                    end = await client.wait(job, reconnect=reconnect)
                    if not ns.json:
                        printer.line(name, text.describe(end))
                    ends.append(end)
            if scope.cancelled_caught:
                raise WaitTimeout(f"timed out after {ns.timeout:g}s: "
                                  f"job {ns.ids[len(ends)]} is still running")
            return job_exit_status(ends[0]), ends[0]
        if what in ("stream", "output"):
            end = await _follow(client, ns.id, name, printer,
                                live=what == "stream" and not ns.no_follow, only_fd=ns.only_fd,
                                reconnect=reconnect)
            return 0, end
        if what == "status":
            status = await client.status(ns.id)
            if not ns.json:
                printer.line(name, text.describe(status))
            return 0, status
        if what == "stop":
            status = await client.stop(ns.id, ns.grace)
            if not ns.json:
                printer.line(name, "process stopped")
            return 0, status
        if what == "list":
            now = time.time()
            filters = list_filters(ns, now)
            if client.welcome.minor >= core.LIST_FILTERS_MINOR or filters["labels"]:
                jobs = await client.list(**filters)
            else:
                jobs = filter_jobs(await client.list(), filters)
            if not ns.json:
                columns = list_columns(ns, jobs)
                for s in jobs:
                    printer.line(name, "\t".join(text.list_row(s, now, columns)))
            return 0, jobs
        if what == "delete":
            await client.delete(ns.id)
            return 0, None
        raise AssertionError(what)  # run_cli checked it

    def on_done(outcome: Outcome[tuple[Any, ...]]) -> None:
        name = outcome.target.name
        printer.flush(name)
        if ns.json:
            print(json.dumps(_json(outcome), sort_keys=True), flush=True)
        elif outcome.error is not None and not isinstance(outcome.error, ConnectionFailed):
            printer.line(name, text.escape(str(outcome.error)), fd=2)
        elif outcome.value is not None and isinstance(outcome.value[1], p.JobStatus):
            status = outcome.value[1]
            if status.state is p.JobState.ERROR:
                printer.line(name, text.describe(status), fd=2)
            if status.dropped_bytes and what in ("run", "stream", "output"):
                printer.line(name, f"jobctl: output truncated: {status.dropped_bytes} bytes "
                             "dropped by the server", fd=2)

    interrupt = _Interrupt(ns, running, printer)
    outcomes: list[Outcome[tuple[Any, ...]]] = []
    with trio.CancelScope() as following:
        async with trio.open_nursery() as nursery:
            watcher = trio.CancelScope()
            if what == "run" and interrupt.policy != "ignore":
                # Ctrl-C: ask, stop or detach, per server (_Interrupt)
                await nursery.start(interrupt.watch, following, watcher)
            outcomes = await fanout(targets, work, on_done=on_done)
            watcher.cancel()
    if following.cancelled_caught:
        for name, (_target, job) in running.items():
            printer.flush(name)
            printer.line(name, f"jobctl: detached: job {job} keeps running (jobctl -s "
                         f"{name} stream {job}; jobctl -s {name} stop {job})", fd=2)
        return 130
    from ._expiry import warn_if_expiring

    for certificate in dict.fromkeys(o.target.certificate for o in outcomes if o.ok):
        warn_if_expiring(certificate)  # once per certificate some server accepted
    worst = 0
    for outcome in outcomes:
        if outcome.error is not None:
            worst = max(worst, outcome.error.exit_status)
            if isinstance(outcome.error, ConnectionFailed) and not ns.json:
                for line in str(outcome.error).splitlines():
                    printer.line(outcome.target.name, text.escape(line), fd=2)
        elif outcome.value is not None:
            worst = max(worst, outcome.value[0])
    return worst


class _Interrupt:
    """Ctrl-C during ``jobctl -s GROUP run``, as for one server (_follow.py): on a
    terminal it asks once whether to stop the jobs (yes: stop each on a second
    connection and follow them to their end; no: follow on); a further Ctrl-C, or
    ``--detach-on-interrupt``, or no terminal, detaches: every job keeps running
    and each server's line names its job. ``--stop-on-interrupt`` stops them. An
    inherited "ignore SIGINT" stays: Ctrl-C does nothing."""

    def __init__(self, ns: argparse.Namespace, running: dict[str, tuple[Target, int]],
                 printer: Printer) -> None:
        import signal

        interactive = sys.stdin.isatty() and sys.stderr.isatty()
        self.policy = getattr(ns, "on_interrupt", None) or ("ask" if interactive else "detach")
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            self.policy = "ignore"  # inherited (a script's background job): it stays
        self.running = running
        self.printer = printer
        self.stopping = False

    async def watch(self, following: trio.CancelScope, watcher: trio.CancelScope, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import signal

        with watcher, trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for _ in signals:
                    if self.policy == "detach" or self.stopping or nursery.child_tasks:
                        following.cancel()  # detach (also a Ctrl-C at the question)
                        return
                    if self.policy == "stop":
                        self._stop(nursery)
                    else:
                        nursery.start_soon(self._ask, nursery)

    async def _ask(self, nursery: trio.Nursery) -> None:
        jobs = len(self.running)
        sys.stderr.write(f"\njobctl: stop the job on {jobs} server{'s' * (jobs != 1)}? "
                         "[y/N] (Ctrl-C again: detach) ")
        sys.stderr.flush()
        answer = b""
        while not answer.endswith(b"\n"):
            await trio.lowlevel.wait_readable(sys.stdin.fileno())
            chunk = os.read(sys.stdin.fileno(), 256)
            if not chunk:
                break
            answer += chunk
        if answer.strip().lower() in (b"y", b"yes"):
            self._stop(nursery)
        else:
            print("jobctl: following on (Ctrl-C again detaches)", file=sys.stderr, flush=True)
            self.policy = "detach"

    def _stop(self, nursery: trio.Nursery) -> None:
        self.stopping = True
        print(f"\njobctl: stopping the jobs on {len(self.running)} servers…",
              file=sys.stderr, flush=True)
        for name, (target, job) in list(self.running.items()):
            nursery.start_soon(self._stop_one, name, target, job)

    async def _stop_one(self, name: str, target: Target, job: int) -> None:
        try:
            async with connect_target(target) as client:
                await client.stop(job)
        except JobctlError as exc:  # it ended meanwhile, or the stop failed: say so
            self.printer.line(name, f"jobctl: {text.escape(str(exc))}", fd=2)


async def _follow(client: Client, job: int, name: str, printer: Printer, *,
                  keep: dict[int, bytearray] | None = None, live: bool = True,
                  only_fd: int | None = None,
                  reconnect: float | None = core.RECONNECT_TIMEOUT) -> p.JobStatus:
    """The job's end, and its output: printed, prefixed line by line; or with
    ``keep``, kept there per fd (JSON_OUTPUT_CAP bytes in all; none for ``{}``)."""
    end: p.JobStatus | None = None
    # aclosing: a write that fails (a closed stdout) ends the stream in this task.
    source = cast("AsyncGenerator[p.OutputChunk | p.End, None]",
                  client.stream(job, reconnect=reconnect) if live else client.output(job))
    async with contextlib.aclosing(source) as events:
        async for event in events:
            if isinstance(event, p.OutputChunk):
                if only_fd is not None and event.fd != only_fd:
                    continue
                if keep is None:
                    printer.write(name, event.fd, bytes(event.data))
                elif event.fd in keep:
                    room = JSON_OUTPUT_CAP - sum(len(b) for b in keep.values())
                    keep[event.fd] += bytes(event.data[:max(room, 0)])
                    if len(event.data) > room:
                        keep[0] = bytearray()  # marks the truncation
            else:
                end = event.status
    assert end is not None
    return end


def _kept_json(kept: dict[int, bytearray]) -> dict[str, Any]:
    return {"stdout": kept[1].decode(errors="replace"),
            "stderr": kept[2].decode(errors="replace"), "output_truncated": 0 in kept}


def _json(outcome: Outcome[tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {"server": outcome.target.name}
    if outcome.error is not None:
        out.update(exit=outcome.error.exit_status, error=str(outcome.error))
        return out
    assert outcome.value is not None
    code, value, *extra = outcome.value
    out["exit"] = code
    for more in extra:
        out.update(more)
    if isinstance(value, p.JobStatus):
        out["status"] = value.to_json()
    elif isinstance(value, list):
        out["jobs"] = [s.to_json() for s in value]
    return out
