"""Answering requests: one short handler per request type, picked from a table.

Theory of operation
-------------------

A connection (``jobd/_session.py``) owns the socket: it reads requests, and
writes what this module answers. This module never touches a socket. Each
request type has one handler in :data:`HANDLERS`, beside the one
authorization table (:data:`jobd._auth.POLICY`) that every handler asks.
A handler gets a :class:`Context` (who asks, the engine, the log, and for a
stream the way out for its chunks) and the request, and returns the reply
message, or raises: :func:`answer` turns every exception into the error
reply the protocol names (``not_found``, ``permission_denied``, ...), and a
bug into ``internal``, logged. A job the caller may not see is ``not_found``,
never ``permission_denied``: that would tell who owns which job.

A stream (``stream``, ``output``: :data:`STREAMS`) sends its output chunks
through ``Context.send_chunk`` as it goes and returns the end frame. A test
drives a handler with a real :class:`jobd.engine.JobManager` and a list that
collects the chunks: no socket, no TLS.

Adding a request is adding a handler and its row here (and the message in
``protocol``); the connection does not change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

import protocol as p
from jobd._attach import AttachDenied, Attachments, ReadOnly, attach
from jobd._auth import POLICY, Action, Identity, Role, Scope
from jobd.engine import (
    BadLimits,
    BadPosition,
    EngineError,
    InvalidState,
    JobNotFound,
    LimitExceeded,
    OutputChunk,
    Unenforceable,
)

if TYPE_CHECKING:
    from jobd._log import EventLog
    from jobd.engine import JobManager

#: Target size of one page of a list response, well under the frame limit
#: (statuses are sized by their real encoding; the first always goes in).
LIST_PAGE_BYTES = 256 * 1024
#: Most jobs read from the database for one list page: a bound on one page's work
#: (each row costs about 30 us to decode and check, plus its share of the frame),
#: so that a page stays well under 20 ms (bench/README.md, *History*).
LIST_PAGE_ROWS = 200
#: A status larger than this cannot come from a request this jobd accepts (the
#: request bounds of protocol/_bounds.py keep every status under ~410 KiB): it
#: is a record an older jobd stored. ``list`` shows it shortened
#: (:func:`_shortened`) rather than fail for everyone.
LIST_ENTRY_MAX = p.MAX_FRAME_SIZE // 2
#: How much of a shortened status's argv ``list`` shows: entries and bytes.
SHORT_ARGV = (64, 4096)
#: Variables systemd hands to jobd itself; a job must not inherit them (a job
#: writing to NOTIFY_SOCKET could claim to be the daemon).
DAEMON_ONLY_ENV = frozenset({b"NOTIFY_SOCKET", b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES",
                             b"WATCHDOG_USEC", b"WATCHDOG_PID"})


#: PATH for jobs when jobd has none (systemd's default for services).
DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def job_environment(names: Sequence[str] = (),
                    environ: Mapping[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """The environment a job gets when its start request names none (and the base an
    ``env_merge`` start adds to): explicit and minimal, never jobd's whole environment,
    which holds the daemon's secrets (``OTEL_EXPORTER_OTLP_HEADERS``, credentials).

    PATH (jobd's, else DEFAULT_PATH) and LANG (jobd's, if set), then each of
    ``names`` (``--job-env``): ``NAME=VALUE`` sets it, ``NAME`` passes jobd's value
    when jobd has one. Checked by the option's parser (jobd._config)."""
    env = os.environb if environ is None else environ
    out = {b"PATH": env.get(b"PATH") or DEFAULT_PATH}
    if env.get(b"LANG"):
        out[b"LANG"] = env[b"LANG"]
    for spec in names:
        name, eq, value = os.fsencode(spec).partition(b"=")
        if eq:
            out[name] = value
        elif name in env:
            out[name] = env[name]
    return out


class Denied(Exception):
    """The caller's role does not allow the request."""


class Refusal(Exception):
    """A request answered with an error of the given code."""

    def __init__(self, code: p.ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Context:
    """What a handler may use.

    Fields:
      identity: the caller, from its verified certificate.
      manager: the engine.
      log: the event log.
      peer: the caller's address (``host:port``), for the log.
      job_env: the environment of a job whose start names none.
      max_jobs_per_user: the running jobs a non-admin may have (``--max-jobs-per-user``).
      starting: around a start: refuses it (:class:`Refusal`) when descriptors run short.
      send_chunk: sends one output chunk of a stream to the caller.
      attachments: how many clients are attached to each job (bounded), server-wide.
      take_input: the input frames of the attach in progress, which the
        connection's reader routes from the moment it read the request
        (``jobd/_attach.py``); the handler closes the channel when it ends.
    """

    identity: Identity
    manager: JobManager
    log: EventLog
    peer: str
    job_env: Mapping[bytes, bytes]
    max_jobs_per_user: int | None
    starting: Callable[[Identity], contextlib.AbstractAsyncContextManager[None]]
    send_chunk: Callable[[OutputChunk], Awaitable[None]]
    attachments: Attachments
    take_input: Callable[[], trio.MemoryReceiveChannel[p.Message]]


async def answer(ctx: Context, request: p.Message) -> p.Message:
    """The reply to *request*: its handler's, or the error its exception names.

    Only a connection's own failures (``trio.BrokenResourceError``,
    ``ClosedResourceError``, raised by ``send_chunk``) pass through.
    """
    reply: p.Message
    try:
        handler = HANDLERS.get(type(request))
        if handler is None:
            raise Refusal(p.ErrorCode.BAD_REQUEST, f"unexpected request {type(request).__name__}")
        reply = await handler(ctx, request)
    except (Denied, AttachDenied) as exc:
        reply = p.Error(p.ErrorCode.PERMISSION_DENIED, f"permission denied: {exc}")
    except ReadOnly as exc:
        reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
    except JobNotFound:
        reply = p.Error(p.ErrorCode.NOT_FOUND, "process not found")
    except InvalidState as exc:
        reply = p.Error(p.ErrorCode.INVALID_STATE, str(exc))
    except BadPosition as exc:
        reply = p.Error(p.ErrorCode.BAD_REQUEST, f"bad position: {exc}")
    except BadLimits as exc:
        reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
    except Refusal as exc:
        reply = p.Error(exc.code, str(exc))
    except LimitExceeded as exc:
        reply = p.Error(p.ErrorCode.LIMIT_EXCEEDED, str(exc))
    except Unenforceable as exc:  # permanent on this machine: not "unavailable"
        reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
    except EngineError as exc:
        reply = p.Error(p.ErrorCode.UNAVAILABLE, str(exc))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise
    except Exception as exc:  # a bug: answer and log it, keep serving this client
        ctx.log.error("request-failed", peer=ctx.peer, who=ctx.identity.name,
                      request=request.TYPE, reason=repr(exc)[:p.MAX_ERROR_MESSAGE])
        reply = p.Error(p.ErrorCode.INTERNAL, "internal error: the request failed")
    if isinstance(reply, p.Error):
        reply = p.Error(reply.code, p.clip(reply.message))
        if isinstance(request, p.Start):
            log_refused_start(ctx.log, ctx.peer, ctx.identity, reply.code, reply.message)
    return reply


def log_refused_start(log: EventLog, peer: str, identity: Identity | None,
                      code: p.ErrorCode, reason: str) -> None:
    """Every refused start is an event: who asked, with what role, and why."""
    who = identity.name if identity is not None else "-"
    role = identity.role.value if identity is not None else "-"
    log.info("start-refused", peer=peer, who=who, role=role, code=code.value, reason=reason)


# -- authorization (every handler asks POLICY through these) -------------------

def _require(ctx: Context, action: Action, job: int | None = None) -> None:
    """Denied unless the caller's role may do *action* on some job."""
    if not ctx.identity.allowed(action):
        role = ctx.identity.role.value
        ctx.log.info("request-denied", who=ctx.identity.name, role=role,
                     action=action.value, id=job, reason="role")
        raise Denied(f"role {role} may not {action.value} jobs")


def _visible(ctx: Context, job: int, action: Action = Action.READ) -> p.JobStatus:
    """The job's status if the caller may see it, else JobNotFound (no existence leak)."""
    status = ctx.manager.status(job)
    if not ctx.identity.sees(status.owner):
        ctx.log.info("request-denied", who=ctx.identity.name, action=action.value,
                     id=job, reason="not the caller's job")
        raise JobNotFound(job)
    return status


def _owned(ctx: Context, job: int, action: Action) -> None:
    """JobNotFound unless the caller may do *action* on this job."""
    status = _visible(ctx, job, action)
    if not ctx.identity.may(action, status.owner):
        ctx.log.info("request-denied", who=ctx.identity.name, action=action.value,
                     id=job, reason="not the caller's job")
        raise JobNotFound(job)


# -- one handler per request type ------------------------------------------------

async def _start(ctx: Context, request: p.Start) -> p.Message:
    _require(ctx, Action.START)
    return await _start_job(ctx, request)


async def _rerun(ctx: Context, request: p.Rerun) -> p.Message:
    """A new job from an earlier job's start (protocol 1.2): the caller's own
    jobs, an admin's any (POLICY's RERUN), the caller owning the new one."""
    _require(ctx, Action.RERUN, request.job)
    _owned(ctx, request.job, Action.RERUN)
    ctx.log.info("rerun-requested", id=request.job, who=ctx.identity.name)
    return await _start_job(ctx, _rerun_request(ctx, request.job))


def _rerun_request(ctx: Context, job: int) -> p.Start:
    """The start request a rerun of *job* makes: its argv and labels, and its
    start's cwd, environment and requested limits (kept in its record)."""
    status, spec = ctx.manager.spec(job)
    if spec is None:
        raise Refusal(p.ErrorCode.INVALID_STATE, f"job {job} was started by an older jobd, "
                      "which did not keep its cwd and environment: start it anew")
    try:
        limits = spec.get("limits")
        return p.Start(argv=status.argv, cwd=spec.get("cwd"), env=spec.get("env"),
                       limits=p.Limits.from_wire(limits) if limits is not None else None,
                       env_merge=bool(spec.get("env_merge")), labels=status.labels,
                       stdin=status.stdin, tty=status.tty)
    except (p.FieldError, TypeError, ValueError) as exc:  # a damaged record
        raise Refusal(p.ErrorCode.INVALID_STATE,
                      f"job {job}'s start cannot be repeated: {exc}") from None


def start_spec(request: p.Start) -> dict[str, Any]:
    """What a job's record keeps of its start, for ``rerun``: the request's own
    cwd, environment (as given, not merged: a rerun merges it with the server's
    environment of the day) and requested limits (the server's defaults apply
    again)."""
    return {"cwd": request.cwd,
            "env": [[k, v] for k, v in request.env] if request.env is not None else None,
            "env_merge": request.env_merge,
            "limits": request.limits.to_wire() if request.limits is not None else None}


async def _start_job(ctx: Context, request: p.Start) -> p.Message:
    env: Mapping[bytes, bytes]
    if request.env is None:
        env = ctx.job_env
    elif request.env_merge:
        env = {**ctx.job_env, **dict(request.env)}
    else:
        env = dict(request.env)
    who = ctx.identity.name
    admin = ctx.identity.role is Role.ADMIN
    async with ctx.starting(ctx.identity):
        status = await ctx.manager.start(
            request.argv, who, cwd=request.cwd, env=env, limits=request.limits,
            max_running=None if admin else ctx.max_jobs_per_user, stdin=request.stdin,
            tty=request.tty, labels=request.labels, spec=start_spec(request))
    if status.state is p.JobState.ERROR:
        ctx.log.info("job-failed", id=status.id, owner=who, status=status.describe())
    return p.Started(status)


async def _stop(ctx: Context, request: p.Stop) -> p.Message:
    _require(ctx, Action.STOP, request.job)
    _owned(ctx, request.job, Action.STOP)
    ctx.log.info("stop-requested", id=request.job, who=ctx.identity.name, grace=request.grace)
    return p.Stopped(await ctx.manager.stop(request.job, request.grace))


async def _status(ctx: Context, request: p.GetStatus) -> p.Message:
    return p.StatusResult(_visible(ctx, request.job))


async def _delete(ctx: Context, request: p.Delete) -> p.Message:
    _require(ctx, Action.DELETE, request.job)
    _owned(ctx, request.job, Action.DELETE)
    try:
        await ctx.manager.delete(request.job)
    except InvalidState:
        raise Refusal(p.ErrorCode.INVALID_STATE,
                      "process is running: stop it before deleting it") from None
    ctx.log.info("job-deleted", id=request.job, who=ctx.identity.name)
    return p.Deleted(request.job)


async def _prune(ctx: Context, request: p.Prune) -> p.Message:
    _require(ctx, Action.PRUNE)
    who = ctx.identity.name
    removed = await ctx.manager.prune(request.older_than, reason=f"prune by {who}")
    ctx.log.info("pruned", who=who, older_than=request.older_than, removed=removed)
    return p.Pruned(removed)


async def _list(ctx: Context, request: p.ListJobs) -> p.Message:
    """One page, filtered by the database (owner, states, since, labels) from its indexes;
    a caller who may read only its own jobs gets only those, whatever it asks."""
    owner = request.owner
    if POLICY[ctx.identity.role][Action.READ] is not Scope.ALL:
        if owner is not None and owner != ctx.identity.name:
            return p.JobList((), False, 0 if request.count else None)
        owner = ctx.identity.name
    statuses, more, total = await ctx.manager.list_page(
        request.after, LIST_PAGE_ROWS, owner=owner, states=request.states,
        since=request.since, count=request.count, labels=request.labels)
    page: list[p.JobStatus] = []
    size = 0
    for status in statuses:
        cost = p.encoded_size(status)
        if cost > LIST_ENTRY_MAX:
            status = _shortened(status)
            cost = p.encoded_size(status)
        if page and size + cost > LIST_PAGE_BYTES:
            more = True
            break
        page.append(status)
        size += cost
    return p.JobList(tuple(page), more, total)


async def _stream(ctx: Context, request: p.Stream) -> p.Message:
    return await _send_output(ctx, request, follow=True)


async def _output(ctx: Context, request: p.Output) -> p.Message:
    return await _send_output(ctx, request, follow=False)


async def _send_output(ctx: Context, request: p.Stream | p.Output, *, follow: bool) -> p.End:
    """Send the output chunks; return the end frame. Errors (not found, a bad
    position, a job deleted meanwhile) are answered by :func:`answer`."""
    _visible(ctx, request.job)
    if request.end_only:  # `jobctl wait`: no output, the end when the job has ended
        if follow:
            return p.End(await ctx.manager.wait(request.job), request.position)
        return p.End(ctx.manager.status(request.job), request.position)
    reader = ctx.manager.follow_output if follow else ctx.manager.read_output
    chunks = reader(request.job, request.position, timestamps=request.timestamps,
                    resizes=request.resizes)
    position = request.position
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            await ctx.send_chunk(chunk)
            position = chunk.position
    # The status of the job just read, even if it was deleted or pruned meanwhile.
    return p.End(chunks.status(), position)


async def _attach(ctx: Context, request: p.Attach) -> p.Message:
    """Output out and input in at once (jobd/_attach.py has the theory)."""
    inputs = ctx.take_input()
    async with inputs:
        return await attach(request, identity=ctx.identity, manager=ctx.manager, log=ctx.log,
                            peer=ctx.peer, attachments=ctx.attachments,
                            send_chunk=ctx.send_chunk, inputs=inputs)


Handler = Callable[[Context, Any], Awaitable[p.Message]]

#: The handler of each request type (the hello is the connection's, not here).
HANDLERS: dict[type[p.Message], Handler] = {
    p.Start: _start,
    p.Stop: _stop,
    p.GetStatus: _status,
    p.Delete: _delete,
    p.ListJobs: _list,
    p.Prune: _prune,
    p.Rerun: _rerun,
    p.Stream: _stream,
    p.Output: _output,
    p.Attach: _attach,
}

#: The requests answered with a stream of chunks: a client that goes away ends
#: them at once (the one-shot others run to completion, their answer lost).
STREAMS: frozenset[type[p.Message]] = frozenset({p.Stream, p.Output, p.Attach})


def _shortened(status: p.JobStatus) -> p.JobStatus:
    """*status* cut to fit a list page: the first arguments (then ``...``), the
    error clipped, at most MAX_IO_DEVICES devices per direction. For records an
    older jobd stored before requests were bounded; the full record stays on disk.
    """
    entries, budget = SHORT_ARGV
    argv: list[bytes] = []
    for arg in status.argv[:entries]:
        if budget <= 0:
            break
        argv.append(arg[:budget])
        budget -= len(arg)
    if len(argv) < len(status.argv) or budget < 0:
        argv.append(b"...")
    limits = status.limits
    if limits is not None:
        limits = replace(limits, io_read_bps=limits.io_read_bps[:p.MAX_IO_DEVICES],
                         io_write_bps=limits.io_write_bps[:p.MAX_IO_DEVICES])
    error = p.clip(status.error) if status.error is not None else None
    return replace(status, argv=tuple(argv), error=error, limits=limits)


__all__ = ["HANDLERS", "STREAMS", "Context", "Denied", "Refusal", "answer", "job_environment",
           "log_refused_start"]
