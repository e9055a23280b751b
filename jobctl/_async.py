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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

import protocol as p

from . import _calls as calls
from . import _core as core
from ._errors import ConfigError, ConnectionFailed, InvalidArgument

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
            self._conn.receive_data(data)

    async def _send(self, message: p.Message) -> None:
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
                    await self.aclose()
                raise

    async def _events(self, call: calls.Call[None]) -> AsyncIterator[p.OutputChunk | p.End]:
        """Drive a call, yielding what it emits (a stream's chunks and its End)."""
        async with self._lock:
            value = None
            while True:
                try:
                    op = call.send(value)
                except StopIteration:
                    return
                if isinstance(op, calls.Emit):
                    yield op.event
                    value = None
                    continue
                try:
                    value = await self._do(op)
                except p.ProtocolError as exc:
                    raise core.lost(exc) from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._stream.aclose()

    # -- requests (each a call of jobctl/_calls.py) ----------------------------------

    async def start(self, argv: Argv, *, cwd: bytes | str | None = None,
                    env: core.Env | None = None, limits: p.Limits | None = None,
                    env_merge: bool = False) -> p.JobStatus:
        """Start a job (as :meth:`jobctl.BlockingClient.start`)."""
        return await self._run(calls.start(self.welcome, argv, cwd, env, limits, env_merge))

    async def run(self, argv: Argv, *, cwd: bytes | str | None = None,
                  env: core.Env | None = None, limits: p.Limits | None = None,
                  env_merge: bool = False,
                  on_output: Callable[[p.OutputChunk], None] | None = None) -> p.JobStatus:
        """Start a job, follow its output until it ends, return its final status
        (as :meth:`jobctl.BlockingClient.run`: ``on_output`` gets each chunk, by
        default written to this process's stdout and stderr)."""
        return await self._run(calls.run(self.welcome, argv, cwd, env, limits, env_merge,
                                         on_output))

    async def wait(self, job: int) -> p.JobStatus:
        """Wait until the job has ended; its final status. No output is sent.

        To bound the wait, use a Trio cancel scope (``trio.fail_after``): if it
        expires, this connection is closed (it was in the middle of the
        request) and the scope's exception propagates.
        """
        return await self._run(calls.wait(self.welcome, job), close_on_error=True)

    async def stop(self, job: int, grace: float | None = None) -> p.JobStatus:
        return await self._run(calls.stop(job, grace))

    async def status(self, job: int) -> p.JobStatus:
        return await self._run(calls.status(job))

    async def list(self, *, owner: str | None = None, states: Sequence[p.JobState] = (),
                   since: float | None = None) -> list[p.JobStatus]:
        """Every job the caller may see that matches the filters (all pages)."""
        return await self._run(calls.list_all(self.welcome, owner, states, since))

    async def list_page(self, after: int = 0, *, owner: str | None = None,
                        states: Sequence[p.JobState] = (), since: float | None = None,
                        count: bool = False) -> p.JobList:
        """One page of jobs with IDs above ``after`` (filters as for :meth:`list`);
        ``count``: with the total that match. Filters and counts need a server of
        protocol 1.1 or later (ConfigError otherwise, nothing sent)."""
        return await self._run(calls.list_page(self.welcome, after, owner, states, since,
                                               count))

    async def prune(self, older_than: float) -> int:
        """Remove every finished job that ended more than ``older_than`` seconds ago,
        with its output (admin only; protocol 1.1); how many were removed."""
        return await self._run(calls.prune(self.welcome, older_than))

    async def delete(self, job: int) -> None:
        await self._run(calls.delete(job))

    def stream(self, job: int, position: int = 0, *,
               timestamps: bool = False) -> AsyncIterator[p.OutputChunk | p.End]:
        """Output from ``position``, following live output; OutputChunk events then End.
        Resume after a lost connection with the last chunk's position. With
        ``timestamps``, each chunk carries its ``time`` (servers from protocol 1.1)."""
        return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                 follow=True))

    def output(self, job: int, position: int = 0, *,
               timestamps: bool = False) -> AsyncIterator[p.OutputChunk | p.End]:
        """Like :meth:`stream`, but only the output that exists now."""
        return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                 follow=False))

    def _output(self, request: p.Stream | p.Output) -> AsyncIterator[p.OutputChunk | p.End]:
        return self._events(calls.output(request))


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
    try:
        yield client
    finally:
        await client.aclose()


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
                pin.check(stream.getpeercert(binary_form=True))
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
