"""The attach request: a job's output out, the caller's input in, at once.

Theory of operation
-------------------

An attach is a stream that also listens. The handler runs two tasks in one
nursery:

* *output*: follows the job's log from the requested position (or a recent
  record boundary: :data:`REPLAY_BYTES` back, enough to repaint a shell's
  screen) and sends each chunk, exactly as ``stream`` does;
* *input*: takes the frames the connection's reader routed to this attach
  (``input``, ``eof``, ``resize``, ``detach``) from a small channel and
  carries them out in order: input is written to the job at the job's pace.

Backpressure runs the whole way: a job that does not read its stdin makes
``write_input`` wait; the input task then stops taking frames; the channel
(:data:`INPUT_QUEUE` frames, each at most ``MAX_INPUT_CHUNK`` bytes) fills;
the reader stops reading that connection; TCP pushes back to the client.
Only that connection waits: other clients, other attaches to the same job
and its output are untouched. When the attach ends, the channel is closed,
which releases a reader blocked on it (it discards late frames).

The attach ends with ``end`` when the job's output is over (the job ended:
the final status), or at once when the caller detaches (the status now, the
position of the last chunk sent). Several clients may attach to one job
(:data:`MAX_ATTACHED_PER_JOB`); the owner (control) and admin may type,
observe only watches (``Action.INPUT`` in :data:`jobd._auth.POLICY`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import trio

import protocol as p
from jobd._auth import Action, Identity
from jobd._log import EventLog
from jobd.engine import InvalidState, JobManager, JobNotFound, LimitExceeded, NoInput, OutputChunk

#: Output replayed by an attach that names no position: the first record that
#: starts within the last this many bytes. A shell's screen of 200x60 with
#: colours is ~20-40 KiB; ``position: 0`` replays everything.
REPLAY_BYTES = 64 * 1024
#: Input frames waiting for one attach's input task (each at most
#: MAX_INPUT_CHUNK bytes: at most 1 MiB queued per attach).
INPUT_QUEUE = 4
#: Clients attached to one job at once.
MAX_ATTACHED_PER_JOB = 64


class Attachments:
    """How many clients are attached to each job (bounded)."""

    def __init__(self, per_job: int = MAX_ATTACHED_PER_JOB) -> None:
        self.per_job = per_job
        self._count: Counter[int] = Counter()

    @contextlib.contextmanager
    def hold(self, job: int) -> Iterator[None]:
        if self._count[job] >= self.per_job:
            raise LimitExceeded(f"too many clients attached to job {job} "
                                f"(limit {self.per_job})")
        self._count[job] += 1
        try:
            yield
        finally:
            self._count[job] -= 1
            if not self._count[job]:
                del self._count[job]

    def __len__(self) -> int:
        return sum(self._count.values())


class AttachDenied(Exception):
    """The caller's role may not type into this job (permission_denied)."""


class ReadOnly(Exception):
    """Input frames in an attach that did not ask for input (bad_request)."""


async def attach(request: p.Attach, *, identity: Identity, manager: JobManager,
                 log: EventLog, peer: str, attachments: Attachments,
                 send_chunk: Callable[[OutputChunk], Awaitable[None]],
                 inputs: trio.MemoryReceiveChannel[p.Message]) -> p.End:
    """Serve one attach; returns its end frame.

    Raises JobNotFound (also for a job the caller may not see), AttachDenied,
    InvalidState or NoInput (input asked of a job that ended or has none),
    LimitExceeded, BadPosition, ReadOnly.
    """
    job = request.job
    status = manager.status(job)
    if not identity.sees(status.owner):
        log.info("request-denied", who=identity.name, action=Action.READ.value, id=job,
                 reason="not the caller's job")
        raise JobNotFound(job)
    if request.input:
        if not identity.may(Action.INPUT, status.owner):
            role = identity.role.value
            log.info("request-denied", who=identity.name, role=role,
                     action=Action.INPUT.value, id=job, reason="role")
            raise AttachDenied(f"role {role} may not type into jobs")
        if not status.running:
            raise InvalidState(status)
        if not status.stdin:
            raise NoInput(status)
    position = request.position
    if position is None:
        position = manager.recent_position(job, REPLAY_BYTES)
    chunks = manager.follow_output(job, position)  # BadPosition, JobNotFound
    with attachments.hold(job):
        log.info("attached", id=job, who=identity.name, role=identity.role.value, peer=peer,
                 input=request.input, position=position)
        state = _Attached()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_take_input, request, manager, inputs, state)
            async with contextlib.aclosing(chunks):
                while not state.over:
                    # Only the wait for output is cancelled by a detach, never a send:
                    # a send cut half-way would break the TLS stream the end must use.
                    with trio.CancelScope() as state.waiting:
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            break
                    state.waiting = None
                    if state.over:
                        break
                    await send_chunk(chunk)
                    state.last = chunk.position
            nursery.cancel_scope.cancel()  # the output is over: so is the attach
        if state.refusal is not None:
            raise ReadOnly(state.refusal)
        log.info("detached" if state.detached else "attach-ended", id=job, who=identity.name,
                 peer=peer)
        return p.End(chunks.status(), state.last if state.last is not None else position)


class _Attached:
    """What the two halves of one attach share."""

    def __init__(self) -> None:
        self.waiting: trio.CancelScope | None = None  # the output's wait, while it waits
        self.over = False
        self.detached = False
        self.refusal: str | None = None
        self.last: int | None = None  # the position of the last chunk sent

    def end(self) -> None:
        self.over = True
        if self.waiting is not None:
            self.waiting.cancel()


async def _take_input(request: p.Attach, manager: JobManager,
                      inputs: trio.MemoryReceiveChannel[p.Message], state: _Attached) -> None:
    job = request.job
    async for message in inputs:
        if isinstance(message, p.Detach):
            state.detached = True
            state.end()
            return
        if not request.input:
            state.refusal = (f"{message.TYPE!r} in a read-only attach "
                             "(it did not ask for input)")
            state.end()
            return
        if isinstance(message, p.Input):
            await manager.write_input(job, message.data)
        elif isinstance(message, p.InputEof):
            manager.close_input(job)
        elif isinstance(message, p.Resize):
            manager.resize(job, message.rows, message.cols)


__all__ = ["INPUT_QUEUE", "MAX_ATTACHED_PER_JOB", "REPLAY_BYTES", "AttachDenied", "Attachments",
           "ReadOnly", "attach"]
