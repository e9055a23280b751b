"""The client core, sans-IO: what each request sends, waits for and makes of the answers.

Theory of operation
-------------------

Both clients (the blocking one, ``_blocking.py``, and the Trio one,
``_async.py``) offer the same calls, and a call is more than one message:
``list`` fetches pages until the last, ``run`` starts a job then follows its
output, ``wait`` skips the output an older server sends, every answer is
paired with its request (the expected reply, or the server's error raised).
That logic is written once, here, as generators that do no IO, as h11 serves
sync and async code alike: a call *yields* what it needs done,

- :class:`Send`: send this message;
- :class:`Receive`: hand me the server's next event (within ``within``
  seconds, None: no deadline; ``progress`` called once if it takes longer
  than a moment);
- :class:`Emit`: give this event to the caller (a stream's chunks and end),

and its ``return`` value is the call's result. A driver (:meth:`BlockingClient._run`,
:meth:`Client._run`) moves the bytes: it sends, receives (with its own
timeouts and its own way of reporting a lost connection), and passes each
received event back in with ``send()``. Neither driver knows what a call
means; no call knows about sockets, ``select`` or Trio.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import protocol as p

from . import _core as core

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any, TypeVar

if TYPE_CHECKING:
    R = TypeVar("R")


class Send:
    """Send ``message`` to the server."""

    __slots__ = ("message",)

    def __init__(self, message: p.Message) -> None:
        self.message = message


class Receive:
    """The server's next event, sent back into the call.

    Fields:
      within: seconds the answer may take (None: no deadline; a stream waits
        for a silent job, and the liveness timeout (the server's ticks, TCP
        keepalive) notices a server that is gone).
      progress: called once if the answer takes longer than a moment
        (the blocking client's ``stop`` says what it is doing).
    """

    __slots__ = ("progress", "within")

    def __init__(self, within: float | None,
                 progress: Callable[[], None] | None = None) -> None:
        self.within = within
        self.progress = progress


class Emit:
    """An event for the caller: an output chunk (or a resize, when the request asked
    for them), or a stream's End."""

    __slots__ = ("event",)

    def __init__(self, event: p.OutputChunk | p.Resized | p.End) -> None:
        self.event = event


Op = Send | Receive | Emit
if TYPE_CHECKING:
    #: A call: yields operations, gets received events back, returns its result.
    Call = Generator[Op, Any, R]


def request(message: p.Message, kind: type[R], within: float | None = core.REQUEST_TIMEOUT,
            progress: Callable[[], None] | None = None) -> Call[R]:
    """Send ``message``; its answer, which must be a ``kind`` (else the server's
    error is raised, or ConnectionFailed for anything else)."""
    yield Send(message)
    event = yield Receive(within, progress)
    return core.expect(event, kind)


def start(welcome: p.Welcome, argv: core.Argv, cwd: bytes | str | None, env: core.Env | None,
          limits: p.Limits | None, env_merge: bool, *, stdin: bool = False,
          tty: p.Terminal | None = None, labels: core.LabelsArg = None) -> Call[p.JobStatus]:
    """``labels`` (protocol 1.2): ConfigError naming the versions for an older
    server, nothing sent; so for ``stdin`` and ``tty``."""
    core.check_interactive(welcome, stdin, tty)
    message = core.start_request(argv, cwd, env, limits, core.check_merge(env_merge, welcome),
                                 stdin=stdin, tty=tty, labels=core.labels_arg(labels, welcome))
    return (yield from request(message, p.Started)).status


def rerun(welcome: p.Welcome, job: int) -> Call[p.JobStatus]:
    """A new job like ``job`` (protocol 1.2): its status, as a start's."""
    core.require_minor(welcome, core.LABELS_MINOR, "rerun")
    return (yield from request(core.message(p.Rerun, job), p.Started)).status


def run(welcome: p.Welcome, argv: core.Argv, cwd: bytes | str | None, env: core.Env | None,
        limits: p.Limits | None, env_merge: bool,
        on_output: Callable[[p.OutputChunk], None] | None,
        labels: core.LabelsArg = None) -> Call[p.JobStatus]:
    """Start a job and follow its output until it ends; its final status. A job
    that never ran returns its ``error`` status at once."""
    status = yield from start(welcome, argv, cwd, env, limits, env_merge, labels=labels)
    return (yield from follow_run(welcome, status, on_output))


def follow_run(welcome: p.Welcome, status: p.JobStatus,
               on_output: Callable[[p.OutputChunk], None] | None) -> Call[p.JobStatus]:
    """``run`` after its start: follow the job's output from the first byte to
    its end; its final status (at once if it never ran)."""
    if status.state is p.JobState.ERROR:
        return status
    write = on_output or core.write_chunk
    yield Send(output_request(welcome, status.id, 0, False, follow=True))
    while True:
        event = yield Receive(None)
        if isinstance(event, p.OutputChunk):
            write(event)
        else:
            return core.expect(event, p.End).status


def wait(welcome: p.Welcome, job: int) -> Call[p.JobStatus]:
    """Until the job has ended: its final status. A stream that asks for no output
    (``end_only``, protocol 1.1); from an older server, the output is skipped."""
    yield Send(core.message(p.Stream, job, end_only=welcome.minor >= 1))
    while True:
        event = yield Receive(None)
        if not isinstance(event, p.OutputChunk):
            return core.expect(event, p.End).status


def stop(job: int, grace: float | None,
         progress: Callable[[], None] | None = None) -> Call[p.JobStatus]:
    return (yield from request(core.stop_request(job, grace), p.Stopped,
                               core.stop_timeout(grace), progress)).status


def status(job: int) -> Call[p.JobStatus]:
    return (yield from request(core.message(p.GetStatus, job), p.StatusResult)).status


def delete(job: int) -> Call[None]:
    yield from request(core.message(p.Delete, job), p.Deleted)


def prune(welcome: p.Welcome, older_than: float) -> Call[int]:
    """Remove every finished job that ended more than ``older_than`` seconds ago
    (admin only; protocol 1.1); how many were removed."""
    core.require_minor(welcome, core.LIST_FILTERS_MINOR, "prune")
    return (yield from request(p.Prune(older_than), p.Pruned)).removed


def list_page(welcome: p.Welcome, after: int, owner: str | None, states: Sequence[p.JobState],
              since: float | None, count: bool,
              labels: core.LabelsArg = None) -> Call[p.JobList]:
    """One page of jobs with IDs above ``after``. Filters and counts need a server
    of protocol 1.1 or later, labels 1.2 (ConfigError otherwise, nothing sent)."""
    message = p.ListJobs(after, owner, tuple(states), since, count,
                         core.labels_arg(labels, welcome))
    if message != p.ListJobs(after, labels=message.labels):
        core.require_minor(welcome, core.LIST_FILTERS_MINOR, "list filters and counts")
    return (yield from request(message, p.JobList))


def list_all(welcome: p.Welcome, owner: str | None, states: Sequence[p.JobState],
             since: float | None, labels: core.LabelsArg = None) -> Call[list[p.JobStatus]]:
    """Every job the caller may see that matches the filters: page after page."""
    jobs: list[p.JobStatus] = []
    after = 0
    while True:
        page = yield from list_page(welcome, after, owner, states, since, False, labels)
        jobs.extend(page.jobs)
        if not page.more or not page.jobs:
            return jobs
        after = page.jobs[-1].id


def attach_request(welcome: p.Welcome, job: int, position: int | None,
                   input: bool) -> p.Attach:
    """The attach both clients send (servers of protocol 1.2). An attach runs both
    ways at once, so each driver carries it itself (``BlockingAttach``,
    ``AsyncAttach``): it is not a call."""
    core.require_minor(welcome, core.INTERACTIVE_MINOR, "attach")
    return core.message(p.Attach, job, position, input)


def output_request(welcome: p.Welcome, job: int, position: int, timestamps: bool, *,
                   follow: bool, resizes: bool = False) -> p.Stream | p.Output:
    """A stream (``follow``) or output request; times asked for only from a server
    that sends them (protocol 1.1), resizes likewise (1.2)."""
    times = timestamps and welcome.minor >= 1
    sizes = resizes and welcome.minor >= core.INTERACTIVE_MINOR
    if follow:
        return core.message(p.Stream, job, position, timestamps=times, resizes=sizes)
    return core.message(p.Output, job, position, timestamps=times, resizes=sizes)


class Resume:
    """A follow that outlives its connections (issue 21): which job, where the
    next stream request starts (right after the last chunk received), and the
    reconnect policy (:class:`jobctl._core.Outage`). :meth:`call` is the stream
    over one connection; when it breaks, the driver connects again and runs a
    fresh :meth:`call`, which asks from the position reached: nothing is lost
    or repeated (docs/protocol.md, section 8)."""

    def __init__(self, job: int, position: int, timestamps: bool,
                 outage: core.Outage, resizes: bool = False) -> None:
        self.job = job
        self.position = position
        self.timestamps = timestamps
        self.resizes = resizes
        self.outage = outage

    def call(self, welcome: p.Welcome) -> Call[None]:
        yield Send(output_request(welcome, self.job, self.position, self.timestamps,
                                  follow=True, resizes=self.resizes))
        while True:
            event = yield Receive(None)
            self.outage.progress()
            if isinstance(event, p.OutputChunk | p.Resized):
                self.position = event.position
                yield Emit(event)
                continue
            yield Emit(core.expect(event, p.End))
            return


def output(request: p.Stream | p.Output) -> Call[None]:
    """The chunks of a stream or output answer, then its End, each emitted to the
    caller. No deadline while a silent job writes nothing."""
    yield Send(request)
    while True:
        event = yield Receive(None)
        if isinstance(event, p.OutputChunk | p.Resized):
            yield Emit(event)
            continue
        yield Emit(core.expect(event, p.End))
        return
