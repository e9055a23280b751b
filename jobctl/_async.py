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

import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

import protocol as p

from . import _calls as calls
from . import _core as core
from ._errors import ConfigError, ConnectionFailed, InvalidArgument, JobctlError

if TYPE_CHECKING:
    from ._trust import Pinning

Argv = core.Argv


class Client:
    """One authenticated connection; requests run one at a time, in order."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], welcome: p.Welcome,
                 conn: p.ClientConnection, idle: float | None = None):
        self._stream = stream
        self._conn = conn
        self._lock = trio.StrictFIFOLock()
        #: Liveness: the longest silence of the server while a request is in
        #: progress (it ticks); None: no bound but TCP's.
        self._idle = idle
        #: A new connection like this one (set by ``connect``): what a follow that
        #: reconnects (``reconnect=``) uses.
        self._factory: Callable[[], Awaitable[Client]] | None = None
        #: A call cut short (a cancelled ``wait``, an abandoned stream) leaves the
        #: connection mid-answer: it is closed, and the next request runs on a new
        #: connection (``_factory``) instead of failing (issue 23).
        self._stale = False
        #: Called with a line to show when a follow loses its connection and when it
        #: has it back.
        self.on_reconnect: Callable[[str], None] | None = None
        #: When the server was last heard from (a break after it is a new outage).
        self._heard = trio.current_time()
        self.welcome = welcome
        self.identity = welcome.identity
        self.role = welcome.role

    async def _receive(self) -> Any:
        idle = math.inf if self._idle is None else self._idle
        while True:
            event = self._conn.next_event()
            if event is not p.NEED_DATA:
                return event
            try:
                with trio.move_on_after(idle) as silence:
                    data = await self._stream.receive_some(core.RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise core.lost(exc.__cause__ or exc) from None
            if silence.cancelled_caught:
                raise core.silent(idle)
            self._heard = trio.current_time()
            self._conn.receive_data(data)

    async def _refresh(self) -> None:
        """Replace a connection that was left in the middle of an answer."""
        if self._factory is None:
            raise ConnectionFailed("this connection was closed in the middle of a request")
        fresh = await self._factory()
        self._stream, self._conn, self._idle = fresh._stream, fresh._conn, fresh._idle
        self.welcome, self.identity, self.role = fresh.welcome, fresh.identity, fresh.role
        self._stale = False

    async def _abandon(self) -> None:
        """Close a connection left in the middle of an answer (shielded, bounded)."""
        self._stale = True
        await self.aclose()

    async def _send(self, message: p.Message) -> None:
        if self._stale:
            await self._refresh()
        try:
            frame = self._conn.send(message)
        except p.LocalProtocolError as exc:  # too large for a frame
            raise InvalidArgument(f"cannot send {message.TYPE!r}: {exc}") from None
        try:
            await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise core.lost(exc.__cause__ or exc) from None

    async def _do(self, op: calls.Op) -> Any:
        """Carry out one operation of a call (jobctl/_calls.py): send, or receive
        the next event (within its deadline)."""
        if isinstance(op, calls.Send):
            await self._send(op.message)
            return None
        assert isinstance(op, calls.Receive), op
        if op.within is None:
            return await self._receive()
        try:
            with trio.fail_after(op.within):
                return await self._receive()
        except trio.TooSlowError:
            raise ConnectionFailed(f"no answer from the server within {op.within:g}s") from None

    async def _run(self, call: calls.Call[core.R], *, close_on_error: bool = False) -> core.R:
        """Drive a call to its result, holding the connection. ``close_on_error``:
        a call cut off mid-request (cancelled, failed) closes the connection,
        which cannot go on."""
        async with self._lock:
            value = None
            try:
                while True:
                    try:
                        op = call.send(value)
                    except StopIteration as stop:
                        result: core.R = stop.value
                        return result
                    value = await self._do(op)
            except p.ProtocolError as exc:
                raise core.lost(exc) from None
            except BaseException:
                if close_on_error:
                    await self._abandon()
                raise

    async def _events(self, call: calls.Call[None]) -> AsyncIterator[p.OutputChunk | p.End]:
        """Drive a call, yielding what it emits (a stream's chunks and its End).
        Abandoned or cancelled before its end, the connection is left mid-answer:
        the next request connects again."""
        async with self._lock:
            value = None
            ended = False
            try:
                while True:
                    try:
                        op = call.send(value)
                    except StopIteration:
                        ended = True
                        return
                    if isinstance(op, calls.Emit):
                        event = op.event
                        if isinstance(event, p.End):
                            ended = True
                        # This client never asks for resizes (the blocking one can).
                        assert not isinstance(event, p.Resized), event
                        yield event
                        value = None
                        continue
                    try:
                        value = await self._do(op)
                    except p.ProtocolError as exc:
                        raise core.lost(exc) from None
            finally:
                if not ended:
                    await self._abandon()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._stream.aclose()

    # -- reconnecting (issue 21) ----------------------------------------------------

    async def _reopen(self, outage: core.Outage, exc: JobctlError) -> None:
        """The connection broke with ``exc``: connect again (pausing between tries,
        as ``outage`` says) and carry on over the new one as this same client.
        Raises when ``outage`` gives up, or at once for an error that a new
        connection cannot cure."""
        if self._factory is None or not core.retriable(exc):
            raise exc
        await self.aclose()
        while True:
            pause = outage.lost(exc, trio.current_time(), self._heard)
            if self.on_reconnect is not None and outage.attempts == 1:
                self.on_reconnect(f"{exc}: reconnecting")
            await trio.sleep(pause)
            try:
                fresh = await self._factory()
            except JobctlError as failed:
                exc = failed
                continue
            break
        self._stream, self._conn, self._idle = fresh._stream, fresh._conn, fresh._idle
        self.welcome = fresh.welcome
        self._stale = False
        if self.on_reconnect is not None:
            self.on_reconnect("reconnected")

    async def _resuming(self, resume: calls.Resume) -> AsyncIterator[p.OutputChunk | p.End]:
        while True:
            try:
                async with aclosing(self._events(  # type: ignore[type-var]
                        resume.call(self.welcome))) as events:
                    async for event in events:
                        yield event
                return
            except InvalidArgument:
                raise
            except JobctlError as exc:
                await self._reopen(resume.outage, exc)

    # -- requests (each a call of jobctl/_calls.py) ----------------------------------

    async def start(self, argv: Argv, *, cwd: bytes | str | None = None,
                    env: core.Env | None = None, limits: p.Limits | None = None,
                    env_merge: bool = False, stdin: bool = False,
                    tty: p.Terminal | None = None, labels: core.LabelsArg = None
                    ) -> p.JobStatus:
        """Start a job (as :meth:`jobctl.BlockingClient.start`)."""
        return await self._run(calls.start(self.welcome, argv, cwd, env, limits, env_merge,
                                           stdin=stdin, tty=tty, labels=labels))

    @asynccontextmanager
    async def attach(self, job: int, position: int | None = None, *,
                     input: bool = False) -> AsyncIterator[AsyncAttach]:
        """Attach to a job (as :meth:`jobctl.BlockingClient.attach`)::

            async with client.attach(job.id, input=True) as session:
                await session.send(b"ls\r")
                async for event in session:   # OutputChunk..., then End
                    ...

        One task may send while another iterates. Leaving the block detaches
        (if the job still runs) and reads to the end; the connection is then
        ready for the next request.
        """
        request = calls.attach_request(self.welcome, job, position, input)
        async with self._lock:
            await self._send(request)
            session = AsyncAttach(self, job)
            yield session
            if session.end is None:
                await session.detach()
                async for _ in session:
                    pass

    async def run(self, argv: Argv, *, cwd: bytes | str | None = None,
                  env: core.Env | None = None, limits: p.Limits | None = None,
                  env_merge: bool = False,
                  on_output: Callable[[p.OutputChunk], None] | None = None,
                  stdin: bytes | trio.abc.ReceiveStream | None = None,
                  reconnect: float | None = core.RECONNECT_TIMEOUT,
                  labels: core.LabelsArg = None) -> p.JobStatus:
        """Start a job, follow its output until it ends, return its final status
        (as :meth:`jobctl.BlockingClient.run`: ``on_output`` gets each chunk, by
        default written to this process's stdout and stderr; ``stdin``, bytes or a
        Trio receive stream, is the job's input, then closed; ``reconnect`` as for
        :meth:`stream`, not with ``stdin``)."""
        within = core.check_reconnect(reconnect)
        if stdin is not None:
            status = await self.start(argv, cwd=cwd, env=env, limits=limits,
                                      env_merge=env_merge, stdin=True)
            if status.state is p.JobState.ERROR:
                return status
            write = on_output or core.write_chunk
            source = stdin
            async with self.attach(status.id, 0, input=True) as session:

                async def feed() -> None:
                    if isinstance(source, bytes):
                        await session.send(source)
                    else:
                        while block := await source.receive_some(p.MAX_INPUT_CHUNK):
                            await session.send(block)
                    await session.close_input()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed)
                    async for event in session:
                        if isinstance(event, p.OutputChunk):
                            write(event)
                    nursery.cancel_scope.cancel()  # the job ended: input is moot
            assert session.end is not None
            return session.end.status
        if within is None:
            return await self._run(calls.run(self.welcome, argv, cwd, env, limits, env_merge,
                                             on_output, labels), close_on_error=True)
        status = await self.start(argv, cwd=cwd, env=env, limits=limits, env_merge=env_merge,
                                  labels=labels)
        if status.state is p.JobState.ERROR:
            return status
        write = on_output or core.write_chunk
        end: p.End | None = None
        async with aclosing(self.stream(  # type: ignore[type-var]
                status.id, reconnect=within)) as events:
            async for event in events:
                if isinstance(event, p.OutputChunk):
                    write(event)
                else:
                    end = event
        assert end is not None
        return end.status

    async def wait(self, job: int, *,
                   reconnect: float | None = core.RECONNECT_TIMEOUT) -> p.JobStatus:
        """Wait until the job has ended; its final status. No output is sent.

        To bound the wait, use a Trio cancel scope (``trio.fail_after``): if it
        expires, the scope's exception propagates; the connection, in the middle
        of the answer, is closed, and the next request connects again by itself.
        ``reconnect``: as for :meth:`stream`; the wait is asked again.
        """
        within = core.check_reconnect(reconnect)
        outage = core.Outage(within) if within is not None else None
        while True:
            try:
                return await self._run(calls.wait(self.welcome, job), close_on_error=True)
            except InvalidArgument:
                raise
            except JobctlError as exc:
                if outage is None:
                    raise
                await self._reopen(outage, exc)

    async def stop(self, job: int, grace: float | None = None) -> p.JobStatus:
        return await self._run(calls.stop(job, grace))

    async def status(self, job: int) -> p.JobStatus:
        return await self._run(calls.status(job))

    async def list(self, *, owner: str | None = None, states: Sequence[p.JobState] = (),
                   since: float | None = None, labels: core.LabelsArg = None
                   ) -> list[p.JobStatus]:
        """Every job the caller may see that matches the filters (all pages)."""
        return await self._run(calls.list_all(self.welcome, owner, states, since, labels))

    async def list_page(self, after: int = 0, *, owner: str | None = None,
                        states: Sequence[p.JobState] = (), since: float | None = None,
                        count: bool = False, labels: core.LabelsArg = None) -> p.JobList:
        """One page of jobs with IDs above ``after`` (filters as for :meth:`list`);
        ``count``: with the total that match. Filters and counts need a server of
        protocol 1.1 or later, labels 1.2 (ConfigError otherwise, nothing sent)."""
        return await self._run(calls.list_page(self.welcome, after, owner, states, since,
                                               count, labels))

    async def prune(self, older_than: float) -> int:
        """Remove every finished job that ended more than ``older_than`` seconds ago,
        with its output (admin only; protocol 1.1); how many were removed."""
        return await self._run(calls.prune(self.welcome, older_than))

    async def delete(self, job: int) -> None:
        await self._run(calls.delete(job))

    async def rerun(self, job: int) -> p.JobStatus:
        """Start a new job like ``job`` (as :meth:`jobctl.BlockingClient.rerun`)."""
        return await self._run(calls.rerun(self.welcome, job))

    def stream(self, job: int, position: int = 0, *, timestamps: bool = False,
               reconnect: float | None = core.RECONNECT_TIMEOUT
               ) -> AsyncIterator[p.OutputChunk | p.End]:
        """Output from ``position``, following live output; OutputChunk events then End.
        ``reconnect`` (seconds; None or 0: never): a broken connection is made
        again with backoff and the stream resumed after the last chunk, nothing
        lost or repeated, until that many seconds pass without the server (as
        :meth:`jobctl.BlockingClient.stream`). With ``timestamps``, each chunk
        carries its ``time`` (servers from protocol 1.1)."""
        within = core.check_reconnect(reconnect)
        if within is None:
            return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                     follow=True))
        return self._resuming(calls.Resume(job, position, timestamps, core.Outage(within)))

    def output(self, job: int, position: int = 0, *,
               timestamps: bool = False) -> AsyncIterator[p.OutputChunk | p.End]:
        """Like :meth:`stream`, but only the output that exists now."""
        return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                 follow=False))

    def _output(self, request: p.Stream | p.Output) -> AsyncIterator[p.OutputChunk | p.End]:
        return self._events(calls.output(request))


class AsyncAttach:
    """An attach in progress (:meth:`Client.attach`): ``send``, ``close_input``,
    ``resize`` and ``detach`` go to the server; iterating yields output chunks
    until the ``End`` (kept in ``end``)."""

    def __init__(self, client: Client, job: int) -> None:
        self._client = client
        self.job = job
        self.end: p.End | None = None
        self._detached = False
        self._send_lock = trio.StrictFIFOLock()

    async def _send(self, message: p.Message) -> None:
        async with self._send_lock:
            if self.end is None:
                await self._client._send(message)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), p.MAX_INPUT_CHUNK):
            await self._send(p.Input(bytes(view[at:at + p.MAX_INPUT_CHUNK])))

    async def close_input(self) -> None:
        await self._send(p.InputEof())

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(core.message(p.Resize, rows, cols))

    async def detach(self) -> None:
        if not self._detached:
            self._detached = True
            await self._send(p.Detach())

    def __aiter__(self) -> AsyncAttach:
        return self

    async def __anext__(self) -> p.OutputChunk | p.End:
        if self.end is not None:
            raise StopAsyncIteration
        try:
            event = await self._client._receive()
        except p.ProtocolError as exc:
            raise core.lost(exc) from None
        if isinstance(event, p.OutputChunk):
            return event
        self.end = core.expect(event, p.End)
        return self.end


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
    liveness_timeout: float | None = core.LIVENESS_TIMEOUT,
) -> AsyncIterator[Client]:
    """Connect, complete TLS 1.3, exchange hello and welcome; close on exit.

    With ``pin`` instead of ``ca`` (trust on first use, :mod:`jobctl._trust`),
    the server's certificate is checked against its pin right after the
    handshake, before anything is sent. ``liveness_timeout``: as for
    :func:`jobctl.connect_blocking`.
    """
    client = await _open(address, port, certificate=certificate, key=key, ca=ca,
                         server_name=server_name, connect_timeout=connect_timeout, pin=pin,
                         liveness_timeout=liveness_timeout)
    try:
        yield client
    finally:
        await client.aclose()


async def _open(
    address: str,
    port: int,
    *,
    certificate: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None,
    server_name: str | None,
    connect_timeout: float,
    pin: Pinning | None,
    liveness_timeout: float | None,
) -> Client:
    """A new authenticated connection (what ``connect`` opens and closes)."""
    liveness = core.check_liveness(liveness_timeout)
    if pin is not None:
        ctx = pin.context(certificate, key)
    elif ca is None:
        raise ConfigError("no CA certificate given (and no pin: see jobctl._trust)")
    else:
        ctx = core.client_context(certificate, key, ca)
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(address, port)
    except trio.TooSlowError:
        raise core.connect_error(address, port, TimeoutError()) from None
    except OSError as exc:
        raise core.connect_error(address, port, _first_attempt_error(exc)) from None
    core.set_keepalive(tcp.socket, liveness)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_name or address)
    try:
        client = await _handshake(stream, connect_timeout, pin, liveness)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await tcp.aclose()
        raise
    client._factory = partial(
        _open, address, port, certificate=certificate, key=key, ca=ca,
        server_name=server_name, connect_timeout=connect_timeout, pin=pin,
        liveness_timeout=liveness_timeout)
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
                     pin: Pinning | None = None, liveness: float | None = None) -> Client:
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
                peer = stream.transport_stream.socket.getpeername()[0]
                pin.check(stream.getpeercert(binary_form=True), peer)
            else:
                core.check_server_purpose(stream.getpeercert(binary_form=True))
            try:
                await stream.send_all(conn.send(core.hello(liveness)))
                while True:
                    try:
                        event = conn.next_event()
                    except p.ProtocolError:
                        raise core.refused_before_welcome(None) from None
                    if event is not p.NEED_DATA:
                        welcome = core.check_welcome(event)
                        return Client(stream, welcome, conn, core.idle_timeout(welcome, liveness))
                    conn.receive_data(await stream.receive_some(core.RECEIVE_SIZE))
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                raise core.refused_before_welcome(
                    cause if isinstance(cause, ssl.SSLError) else None) from None
    except trio.TooSlowError:
        raise ConnectionFailed(f"no welcome from the server within {within:g}s") from None
