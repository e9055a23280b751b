"""The Trio client: the same requests as the blocking one, awaitable.

    import jobctl

    async with jobctl.connect("::1", 8000, certificate="alice.pem", key="alice.key",
                              ca="ca.pem") as client:
        job = await client.start(["sleep", "10"])
        async for event in client.stream(job.id):
            ...

No hidden background tasks: every call does its IO in the caller's task.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

import protocol as p

from . import _core as core
from ._errors import ConfigError, ConnectionFailed, InvalidArgument

if TYPE_CHECKING:
    from ._trust import Pinning

Argv = core.Argv


class Client:
    """One authenticated connection; requests run one at a time, in order."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], welcome: p.Welcome,
                 conn: p.ClientConnection,
                 reopen: Callable[[], Awaitable[Client]] | None = None):
        self._stream = stream
        self._conn = conn
        self._lock = trio.StrictFIFOLock()
        self.welcome = welcome
        self.identity = welcome.identity
        self.role = welcome.role
        #: How to connect again: a request cut short (a cancelled ``wait``, an
        #: abandoned stream) leaves the connection mid-answer; it is closed, and
        #: the next request runs on a new connection instead of failing.
        self._reopen = reopen
        self._stale = False

    async def _reconnect(self) -> None:
        if self._reopen is None:
            raise ConnectionFailed("this connection was closed in the middle of a request")
        fresh = await self._reopen()
        self._stream, self._conn, self._stale = fresh._stream, fresh._conn, False
        self.welcome, self.identity, self.role = fresh.welcome, fresh.identity, fresh.role

    async def _abandon(self) -> None:
        """Close a connection left in the middle of an answer (shielded, bounded)."""
        self._stale = True
        await self.aclose()

    async def _receive(self) -> Any:
        while True:
            event = self._conn.next_event()
            if event is not p.NEED_DATA:
                return event
            try:
                data = await self._stream.receive_some(core.RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise core.lost(exc.__cause__ or exc) from None
            self._conn.receive_data(data)

    async def _send(self, message: p.Message) -> None:
        if self._stale:
            await self._reconnect()
        try:
            frame = self._conn.send(message)
        except p.LocalProtocolError as exc:  # too large for a frame
            raise InvalidArgument(f"cannot send {message.TYPE!r}: {exc}") from None
        try:
            await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise core.lost(exc.__cause__ or exc) from None

    async def _request(self, message: p.Message, kind: type[core.R],
                       answer_within: float = core.REQUEST_TIMEOUT) -> core.R:
        async with self._lock:
            await self._send(message)
            try:
                with trio.fail_after(answer_within):
                    return core.expect(await self._receive(), kind)
            except trio.TooSlowError:
                raise ConnectionFailed(
                    f"no answer from the server within {answer_within:g}s") from None
            except p.ProtocolError as exc:
                raise core.lost(exc) from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._stream.aclose()

    async def start(self, argv: Argv, *, cwd: bytes | str | None = None,
                    env: core.Env | None = None, limits: p.Limits | None = None,
                    env_merge: bool = False, labels: core.LabelsArg = None) -> p.JobStatus:
        """Start a job (as :meth:`jobctl.BlockingClient.start`)."""
        message = core.start_request(argv, cwd, env, limits,
                                     core.check_merge(env_merge, self.welcome),
                                     core.labels_arg(labels, self.welcome))
        return (await self._request(message, p.Started)).status

    async def run(self, argv: Argv, *, cwd: bytes | str | None = None,
                  env: core.Env | None = None, limits: p.Limits | None = None,
                  env_merge: bool = False,
                  on_output: Callable[[p.OutputChunk], None] | None = None,
                  labels: core.LabelsArg = None) -> p.JobStatus:
        """Start a job, follow its output until it ends, return its final status
        (as :meth:`jobctl.BlockingClient.run`: ``on_output`` gets each chunk, by
        default written to this process's stdout and stderr)."""
        status = await self.start(argv, cwd=cwd, env=env, limits=limits, env_merge=env_merge,
                                  labels=labels)
        if status.state is p.JobState.ERROR:
            return status
        write = on_output or core.write_chunk
        end: p.End | None = None
        async with aclosing(self.stream(status.id)) as events:  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, p.OutputChunk):
                    write(event)
                else:
                    end = event
        assert end is not None
        return end.status

    async def wait(self, job: int) -> p.JobStatus:
        """Wait until the job has ended; its final status. No output is sent.

        To bound the wait, use a Trio cancel scope (``trio.fail_after``): if it
        expires, the scope's exception propagates; the connection, in the middle
        of the answer, is closed, and the next request connects again by itself.
        """
        request = core.message(p.Stream, job, end_only=self.welcome.minor >= 1)
        async with self._lock:
            await self._send(request)
            try:
                while True:
                    event = await self._receive()
                    if not isinstance(event, p.OutputChunk):  # pre-1.1 servers send output
                        return core.expect(event, p.End).status
            except p.ProtocolError as exc:
                raise core.lost(exc) from None
            except BaseException:
                await self._abandon()  # mid-request: this connection cannot go on
                raise

    async def stop(self, job: int, grace: float | None = None) -> p.JobStatus:
        return (await self._request(core.stop_request(job, grace), p.Stopped,
                                    core.stop_timeout(grace))).status

    async def status(self, job: int) -> p.JobStatus:
        return (await self._request(core.message(p.GetStatus, job), p.StatusResult)).status

    async def list(self, *, owner: str | None = None, states: Sequence[p.JobState] = (),
             since: float | None = None, labels: core.LabelsArg = None) -> list[p.JobStatus]:
        """Every job the caller may see that matches the filters (all pages)."""
        jobs: list[p.JobStatus] = []
        after = 0
        while True:
            page = await self.list_page(after, owner=owner, states=states, since=since,
                                   labels=labels)
            jobs.extend(page.jobs)
            if not page.more or not page.jobs:
                return jobs
            after = page.jobs[-1].id

    async def list_page(self, after: int = 0, *, owner: str | None = None,
                  states: Sequence[p.JobState] = (), since: float | None = None,
                  count: bool = False, labels: core.LabelsArg = None) -> p.JobList:
        """One page of jobs with IDs above ``after`` (filters as for :meth:`list`);
        ``count``: with the total that match. Filters and counts need a server of
        protocol 1.1 or later, labels 1.2 (ConfigError otherwise, nothing sent)."""
        request = p.ListJobs(after, owner, tuple(states), since, count,
                             core.labels_arg(labels, self.welcome))
        if request != p.ListJobs(after, labels=request.labels):
            core.require_minor(self.welcome, core.LIST_FILTERS_MINOR, "list filters and counts")
        return await self._request(request, p.JobList)

    async def prune(self, older_than: float) -> int:
        """Remove every finished job that ended more than ``older_than`` seconds ago,
        with its output (admin only; protocol 1.1); how many were removed."""
        core.require_minor(self.welcome, core.LIST_FILTERS_MINOR, "prune")
        return (await self._request(p.Prune(older_than), p.Pruned)).removed

    async def delete(self, job: int) -> None:
        await self._request(core.message(p.Delete, job), p.Deleted)

    async def rerun(self, job: int) -> p.JobStatus:
        """Start a new job like ``job`` (as :meth:`jobctl.BlockingClient.rerun`)."""
        core.require_minor(self.welcome, core.LABELS_MINOR, "rerun")
        return (await self._request(core.message(p.Rerun, job), p.Started)).status

    def stream(self, job: int, position: int = 0, *,
               timestamps: bool = False) -> AsyncIterator[p.OutputChunk | p.End]:
        """Output from ``position``, following live output; OutputChunk events then End.
        Resume after a lost connection with the last chunk's position. With
        ``timestamps``, each chunk carries its ``time`` (servers from protocol 1.1)."""
        return self._output(core.message(p.Stream, job, position,
                                         timestamps=timestamps and self.welcome.minor >= 1))

    def output(self, job: int, position: int = 0, *,
               timestamps: bool = False) -> AsyncIterator[p.OutputChunk | p.End]:
        """Like :meth:`stream`, but only the output that exists now."""
        return self._output(core.message(p.Output, job, position,
                                         timestamps=timestamps and self.welcome.minor >= 1))

    async def _output(self, request: p.Stream | p.Output
                      ) -> AsyncIterator[p.OutputChunk | p.End]:
        async with self._lock:
            await self._send(request)
            ended = False
            try:
                while True:
                    try:
                        event = await self._receive()
                    except p.ProtocolError as exc:
                        raise core.lost(exc) from None
                    if isinstance(event, p.OutputChunk):
                        yield event
                        continue
                    ended = True
                    yield core.expect(event, p.End)
                    return
            finally:
                if not ended:  # abandoned or cancelled mid-answer
                    await self._abandon()


@asynccontextmanager
async def connect(
    address: str = core.DEFAULT_ADDRESS,
    port: int = core.DEFAULT_PORT,
    *,
    certificate: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None = None,
    server_name: str | None = None,
    connect_timeout: float = core.CONNECT_TIMEOUT,
    pin: Pinning | None = None,
) -> AsyncIterator[Client]:
    """Connect, complete TLS 1.3, exchange hello and welcome; close on exit.

    With ``pin`` instead of ``ca`` (trust on first use, :mod:`jobctl._trust`),
    the server's certificate is checked against its pin right after the
    handshake, before anything is sent.
    """
    if pin is not None:
        ctx = pin.context(certificate, key)
    elif ca is None:
        raise ConfigError("no CA certificate given (and no pin: see jobctl._trust)")
    else:
        ctx = core.client_context(certificate, key, ca)

    async def reopen() -> Client:
        return await _open(address, port, ctx, server_name, connect_timeout, pin, reopen)

    client = await reopen()
    try:
        yield client
    finally:
        await client.aclose()


async def _open(address: str, port: int, ctx: ssl.SSLContext, server_name: str | None,
                connect_timeout: float, pin: Pinning | None,
                reopen: Callable[[], Awaitable[Client]]) -> Client:
    """One connection, welcomed: a Client (``reopen`` makes another like it)."""
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(address, port)
    except trio.TooSlowError:
        raise core.connect_error(address, port, TimeoutError()) from None
    except OSError as exc:
        raise core.connect_error(address, port, _first_attempt_error(exc)) from None
    core.set_keepalive(tcp.socket)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_name or address)
    try:
        client = await _handshake(stream, connect_timeout, pin)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await tcp.aclose()
        raise
    client._reopen = reopen
    return client


def _first_attempt_error(exc: OSError) -> OSError:
    """Trio's "all attempts to connect ... failed" carries each attempt's error
    (connection refused, ...) in its cause: name the first, as the blocking client does."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.errno:
        return OSError(cause.errno, os.strerror(cause.errno))  # without Trio's "error connecting"
    return exc


async def _handshake(stream: trio.SSLStream[trio.SocketStream], within: float,
                     pin: Pinning | None = None) -> Client:
    conn = p.ClientConnection()
    try:
        with trio.fail_after(within):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise core.handshake_error(exc.__cause__ or exc) from None
            # TOFU (issue 15): the pin, checked before the hello goes out, replaces the
            # CA and its purpose check; with a CA, the server must be for serverAuth.
            if pin is not None:
                pin.check(stream.getpeercert(binary_form=True))
            else:
                core.check_server_purpose(stream.getpeercert(binary_form=True))
            try:
                await stream.send_all(conn.send(p.Hello(software=core.SOFTWARE)))
                while True:
                    try:
                        event = conn.next_event()
                    except p.ProtocolError:
                        raise core.refused_before_welcome(None) from None
                    if event is not p.NEED_DATA:
                        return Client(stream, core.check_welcome(event), conn)
                    conn.receive_data(await stream.receive_some(core.RECEIVE_SIZE))
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                raise core.refused_before_welcome(
                    cause if isinstance(cause, ssl.SSLError) else None) from None
    except trio.TooSlowError:
        raise ConnectionFailed(f"no welcome from the server within {within:g}s") from None
