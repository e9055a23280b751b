"""The blocking client: a plain socket, the standard library's ``ssl`` (memory
BIOs) and the sans-IO protocol. It never imports Trio, so one-shot commands
start fast.

    from jobctl import connect_blocking

    with connect_blocking("::1", 8000, certificate="alice.pem", key="alice.key",
                          ca="ca.pem") as client:
        job = client.start([b"echo", b"hello"])
        for event in client.stream(job.id):
            ...
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import protocol as p

from . import _calls as calls
from . import _core as core
from ._errors import (
    ConfigError,
    ConnectionFailed,
    InvalidArgument,
    JobctlError,
    WaitTimeout,
)

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Literal, overload

    from ._trust import Pinning

Argv = core.Argv

#: Bytes taken from the socket per read: many TLS records at once.
SOCKET_READ = 256 * 1024
#: A request not answered within this many seconds gets its ``progress``
#: callback: long enough that a quick stop prints nothing.
PROGRESS_DELAY = 0.5


class TLSChannel:
    """A blocking TLS connection: ``ssl.SSLObject`` over a plain socket.

    ``ssl.SSLSocket`` lets OpenSSL read the socket itself, two ``read`` calls
    per TLS record (its header, then its body: 131,072 system calls per GiB).
    Here the socket is read up to SOCKET_READ bytes at a time into the
    incoming memory BIO, and records are decrypted from there: the same bytes,
    exceptions and timeouts (the socket's), a sixteenth of the system calls.
    """

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_hostname: str | bytes):
        self._raw = raw
        #: (fd, handler): while waiting for the server, call handler() whenever fd
        #: becomes readable (``jobctl run``'s Ctrl-C: a signal wakeup fd).
        self.wakeup: tuple[int, Callable[[], None]] | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing,
                                 server_hostname=server_hostname)
        self._buffer = bytearray(SOCKET_READ)
        self._view = memoryview(self._buffer)

    def settimeout(self, timeout: float | None) -> None:
        self._raw.settimeout(timeout)

    def do_handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._fill()
            else:
                self._flush()
                return

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER): verified by the CA, or to check against a pin."""
        return self._tls.getpeercert(binary_form=True)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)
        self._flush()

    def recv_into(self, buffer: memoryview | bytearray) -> int:
        """Decrypted bytes into ``buffer`` (one TLS record at most); 0 at the end."""
        while True:
            try:
                count: int = self._tls.read(len(buffer), buffer)  # type: ignore[assignment]
                return count
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLEOFError:  # closed without close_notify: an end, as SSLSocket has it
                return 0

    def close(self) -> None:
        self._raw.close()

    def fileno(self) -> int:
        """The socket: readable when :meth:`read_buffered` may have more to give."""
        return self._raw.fileno()

    def read_buffered(self, buffer: memoryview | bytearray) -> int | None:
        """Decrypted bytes already received, without waiting: a count (0 at the
        end), or None when the socket must be read first (:meth:`receive_more`)."""
        try:
            count: int = self._tls.read(len(buffer), buffer)  # type: ignore[assignment]
            return count
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0

    def receive_more(self) -> None:
        """One read of the socket into the TLS layer (blocks until there is data)."""
        self._flush()
        count = self._raw.recv_into(self._buffer)
        if count:
            self._incoming.write(self._view[:count])
        else:
            self._incoming.write_eof()

    def _wait_readable(self, fd: int, handler: Callable[[], None]) -> None:
        """Block until the socket is readable, calling ``handler`` each time ``fd``
        is readable first. Nothing is read from the socket here, so the handler
        may take its time (or raise) without losing a byte."""
        import select

        while True:
            ready, _, _ = select.select([self._raw.fileno(), fd], [], [],
                                        self._raw.gettimeout())
            if not ready:
                raise TimeoutError
            if fd in ready:
                with contextlib.suppress(OSError):
                    os.read(fd, 512)
                handler()
                continue
            return

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.sendall(self._outgoing.read())

    def _fill(self) -> None:
        self._flush()  # the handshake's flights, and any post-handshake answer
        if self.wakeup is not None:
            self._wait_readable(*self.wakeup)
        count = self._raw.recv_into(self._buffer)
        if count:
            self._incoming.write(self._view[:count])
        else:
            self._incoming.write_eof()


class BlockingClient:
    """One authenticated connection; requests run one at a time, in order.

    Attributes after connecting: ``identity`` and ``role`` as the server sees
    them, and ``welcome`` (the server's whole welcome message).
    """

    def __init__(self, sock: TLSChannel, welcome: p.Welcome, conn: p.ClientConnection,
                 idle: float | None = None):
        self._sock = sock
        self._conn = conn
        #: Liveness: the longest silence of the server while a request is in
        #: progress (it ticks); None: no bound but TCP's.
        self._idle = idle
        #: A new connection like this one (set by connect_blocking): what a follow
        #: that reconnects (``reconnect=``) uses.
        self._factory: Callable[[], BlockingClient] | None = None
        #: A request cut short (``wait``'s timeout, a stream abandoned) leaves the
        #: connection in the middle of an answer: it is closed, and the next request
        #: runs on a new connection (``_factory``) instead of failing (issue 23).
        self._stale = False
        #: Called with a line to show when a follow loses its connection and when it
        #: has it back (``jobctl`` shows them on a terminal).
        self.on_reconnect: Callable[[str], None] | None = None
        #: When the server was last heard from (any bytes): a break after it
        #: starts a new outage (core.Outage).
        self._heard = time.monotonic()
        self.welcome = welcome
        self.identity = welcome.identity
        self.role = welcome.role

    # -- connection -------------------------------------------------------------

    def _receive(self, timeout: float | None, *, quiet: bool = False) -> Any:
        """The next event. No event within ``timeout``: ConnectionFailed, or with
        ``quiet`` TimeoutError (nothing was read: the caller may wait on). The
        server silent for longer than the liveness timeout: ConnectionFailed."""
        conn = self._conn
        idle = self._idle
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = conn.next_event()
            if event is not p.NEED_DATA:
                return event
            # Never 0: that would make the socket non-blocking rather than time out.
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            wait = idle if left is None else left if idle is None else min(idle, left)
            self._sock.settimeout(wait)
            try:
                _receive_into(self._sock, conn)
                self._heard = time.monotonic()
            except TimeoutError:
                if idle is not None and wait is idle:
                    raise core.silent(idle) from None
                if quiet:
                    raise
                raise ConnectionFailed(f"no answer from the server within {timeout:g}s") from None
            except (OSError, ssl.SSLError) as exc:
                raise core.lost(exc) from None

    def _refresh(self) -> None:
        """Replace a connection that was left in the middle of an answer."""
        if self._factory is None:
            raise ConnectionFailed("this connection was closed in the middle of a request")
        fresh = self._factory()
        fresh._sock.wakeup = self._sock.wakeup  # set_wakeup holds for the client
        self._sock, self._conn, self._idle = fresh._sock, fresh._conn, fresh._idle
        self.welcome, self.identity, self.role = fresh.welcome, fresh.identity, fresh.role
        self._stale = False

    def _abandon(self) -> None:
        self.close()
        self._stale = True

    def _send(self, message: p.Message) -> None:
        if self._stale:
            self._refresh()
        try:
            frame = self._conn.send(message)
        except p.LocalProtocolError as exc:  # too large for a frame; or a request in progress
            raise InvalidArgument(f"cannot send {message.TYPE!r}: {exc}") from None
        try:
            self._sock.sendall(frame)
        except (OSError, ssl.SSLError) as exc:
            raise core.lost(exc) from None

    def _do(self, op: calls.Op, deadline: float | None = None) -> Any:
        """Carry out one operation of a call (jobctl/_calls.py): send, or receive
        the next event. With ``deadline`` (``wait``'s timeout), a receive past it
        raises TimeoutError, the caller's to report."""
        if isinstance(op, calls.Send):
            self._send(op.message)
            return None
        assert isinstance(op, calls.Receive), op
        within = op.within
        try:
            if deadline is not None:
                # Never 0: that would make the socket non-blocking rather than time out.
                return self._receive(max(deadline - time.monotonic(), 1e-3), quiet=True)
            if op.progress is not None and (within is None or within > PROGRESS_DELAY):
                try:
                    return self._receive(PROGRESS_DELAY, quiet=True)
                except TimeoutError:
                    op.progress()
                    within = None if within is None else within - PROGRESS_DELAY
            return self._receive(within)
        except p.ProtocolError as exc:
            raise core.lost(exc) from None

    def _run(self, call: calls.Call[core.R], deadline: float | None = None) -> core.R:
        """Drive a call to its result."""
        value = None
        while True:
            try:
                op = call.send(value)
            except StopIteration as stop:
                result: core.R = stop.value
                return result
            try:
                value = self._do(op, deadline)
            except InvalidArgument:
                raise  # refused before anything was sent: the connection goes on
            except BaseException:
                # Cut off mid-request (lost, timed out, interrupted): the connection
                # cannot go on, and the next request connects again.
                self._abandon()
                raise

    def _events(self, call: calls.Call[None]) -> Iterator[core.StreamEvent]:
        """Drive a call, yielding what it emits (a stream's chunks and its End).
        Abandoned before its end (closed, or an error), the connection is left
        mid-answer: the next request connects again."""
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
                    if isinstance(op.event, p.End):
                        ended = True
                    yield op.event
                    value = None
                else:
                    value = self._do(op)
        finally:
            if not ended:
                self._abandon()

    # -- reconnecting (issue 21) ----------------------------------------------------

    def _pause(self, seconds: float) -> None:
        """Sleep, calling the wakeup handler (Ctrl-C in ``jobctl run``) meanwhile."""
        wakeup = self._sock.wakeup
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if wakeup is None:
                time.sleep(left)
                return
            import select

            ready, _, _ = select.select([wakeup[0]], [], [], left)
            if ready:
                with contextlib.suppress(OSError):
                    os.read(wakeup[0], 512)
                wakeup[1]()

    def _reopen(self, outage: core.Outage, exc: JobctlError,
                deadline: float | None = None) -> None:
        """The connection broke with ``exc``: connect again (pausing between tries,
        as ``outage`` says, and not past ``deadline``: then WaitTimeout) and carry
        on over the new connection as this same client. Raises when ``outage``
        gives up, or at once for an error that a new connection cannot cure."""
        if self._factory is None or not core.retriable(exc):
            raise exc
        self._abandon()  # whatever ends the loop below, the next request connects again
        while True:
            pause = outage.lost(exc, time.monotonic(), self._heard)
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0.0))
            if self.on_reconnect is not None and outage.attempts == 1:
                self.on_reconnect(f"{exc}: reconnecting")
            self._pause(pause)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout("the deadline passed while reconnecting")
            try:
                fresh = self._factory()
            except JobctlError as failed:
                exc = failed
                continue
            break
        fresh._sock.wakeup = self._sock.wakeup
        self._sock, self._conn, self._idle = fresh._sock, fresh._conn, fresh._idle
        self.welcome = fresh.welcome
        self._stale = False
        if self.on_reconnect is not None:
            self.on_reconnect("reconnected")

    def _resuming(self, resume: calls.Resume) -> Iterator[core.StreamEvent]:
        while True:
            try:
                yield from self._events(resume.call(self.welcome))
                return
            except InvalidArgument:
                raise
            except JobctlError as exc:
                self._reopen(resume.outage, exc)

    def set_wakeup(self, fd: int | None, handler: Callable[[], None] | None) -> None:
        """While waiting for the server, call ``handler()`` each time ``fd`` is
        readable (a signal's wakeup fd); None, None: no more. The handler runs
        between reads, so it may take its time, or raise to end the request in
        progress (the connection is then only good for closing)."""
        self._sock.wakeup = (fd, handler) if fd is not None and handler is not None else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests (each a call of jobctl/_calls.py) ----------------------------------

    def start(self, argv: Argv, *, cwd: bytes | str | None = None,
              env: core.Env | None = None, limits: p.Limits | None = None,
              env_merge: bool = False, stdin: bool = False,
              tty: p.Terminal | None = None, labels: core.LabelsArg = None) -> p.JobStatus:
        """Start a job. The status may be ``error`` (the command could not run).

        ``argv``, ``cwd`` and ``env`` names and values may be bytes or str (str
        is encoded as the OS does). ``env`` None: the server's environment for
        jobs; a mapping: the job's whole environment, or with ``env_merge``
        (servers from protocol 1.1) added to the server's. ``stdin``: the job's
        stdin is a pipe that :meth:`attach` writes to; ``tty``: the job runs on
        a pseudo-terminal of that size (servers from protocol 1.2). ``labels``: a
        mapping or (key, value) pairs (servers from protocol 1.2).
        """
        return self._run(calls.start(self.welcome, argv, cwd, env, limits, env_merge,
                                     stdin=stdin, tty=tty, labels=labels))

    def run(self, argv: Argv, *, cwd: bytes | str | None = None, env: core.Env | None = None,
            limits: p.Limits | None = None, env_merge: bool = False,
            on_output: Callable[[p.OutputChunk], None] | None = None,
            stdin: Input | None = None,
            reconnect: float | None = core.RECONNECT_TIMEOUT,
            labels: core.LabelsArg = None) -> p.JobStatus:
        """Start a job and follow its output from the first byte until it ends;
        its final status (``jobctl.exit_status`` makes an exit status of it).

        ``on_output`` gets each chunk; by default the job's stdout and stderr are
        written to this process's, as ``subprocess.run`` does. A job that never
        ran returns its ``error`` status at once. ``stdin`` (bytes, a binary
        file, or a file descriptor) is the job's input, sent to its end, then
        closed; without it the job's stdin is /dev/null. ``reconnect``: as for
        :meth:`stream` (the start itself is never sent twice; a run with
        ``stdin`` does not reconnect: input in flight could be lost or repeated).
        """
        within = core.check_reconnect(reconnect)
        if stdin is not None:
            status = self.start(argv, cwd=cwd, env=env, limits=limits, env_merge=env_merge,
                                stdin=True)
            if status.state is p.JobState.ERROR:
                return status
            write = on_output or core.write_chunk
            with self.attach(status.id, 0, input=True) as session:
                for block in _blocks(stdin):
                    session.send(block)
                    for event in session.poll():
                        if isinstance(event, p.OutputChunk):
                            write(event)
                session.close_input()
                for event in session:
                    if isinstance(event, p.OutputChunk):
                        write(event)
                assert session.end is not None
                return session.end.status
        if within is None:
            return self._run(calls.run(self.welcome, argv, cwd, env, limits, env_merge,
                                       on_output, labels))
        status = self.start(argv, cwd=cwd, env=env, limits=limits, env_merge=env_merge,
                            labels=labels)
        if status.state is p.JobState.ERROR:
            return status
        write = on_output or core.write_chunk
        end: p.End | None = None
        for event in self.stream(status.id, reconnect=within):
            if isinstance(event, p.OutputChunk):
                write(event)
            else:
                end = event
        assert end is not None
        return end.status

    def wait(self, job: int, timeout: float | None = None, *,
             reconnect: float | None = core.RECONNECT_TIMEOUT) -> p.JobStatus:
        """Block until the job has ended; its final status. No output is sent.

        ``timeout`` (seconds): WaitTimeout if it has not ended by then. The
        connection was in the middle of the answer, so it is closed; the next
        request connects again by itself (``wait`` then ``stop`` just works).
        ``reconnect``: as for :meth:`stream`; the wait is asked again.
        """
        if timeout is not None and not timeout >= 0:
            raise InvalidArgument(f"invalid argument: timeout must be 0 or more, not {timeout}")
        deadline = None if timeout is None else time.monotonic() + min(timeout, core.MAX_TIMEOUT)
        within = core.check_reconnect(reconnect)
        outage = core.Outage(within) if within is not None else None
        while True:
            try:
                return self._run(calls.wait(self.welcome, job), deadline)
            except TimeoutError:  # _run has abandoned the connection already
                raise WaitTimeout(f"job {job} did not end within {timeout:g}s") from None
            except InvalidArgument:
                raise
            except JobctlError as exc:
                if outage is None:
                    raise
                try:
                    self._reopen(outage, exc, deadline)
                except WaitTimeout:
                    raise WaitTimeout(f"job {job} did not end within {timeout:g}s") from None

    def stop(self, job: int, grace: float | None = None, *,
             progress: Callable[[], None] | None = None) -> p.JobStatus:
        """Stop a job; returns once every process of it is gone. ``progress`` is
        called once if that takes a while (the CLI says what it is doing)."""
        return self._run(calls.stop(job, grace, progress))

    def status(self, job: int) -> p.JobStatus:
        return self._run(calls.status(job))

    def list(self, *, owner: str | None = None, states: Sequence[p.JobState] = (),
             since: float | None = None, labels: core.LabelsArg = None) -> list[p.JobStatus]:
        """Every job the caller may see that matches the filters (all pages)."""
        return self._run(calls.list_all(self.welcome, owner, states, since, labels))

    def list_page(self, after: int = 0, *, owner: str | None = None,
                  states: Sequence[p.JobState] = (), since: float | None = None,
                  count: bool = False, labels: core.LabelsArg = None) -> p.JobList:
        """One page of jobs with IDs above ``after`` (filters as for :meth:`list`);
        ``count``: with the total that match. Filters and counts need a server of
        protocol 1.1 or later, labels 1.2 (ConfigError otherwise, nothing sent)."""
        return self._run(calls.list_page(self.welcome, after, owner, states, since, count,
                                         labels))

    def prune(self, older_than: float) -> int:
        """Remove every finished job that ended more than ``older_than`` seconds ago,
        with its output (admin only; protocol 1.1); how many were removed."""
        return self._run(calls.prune(self.welcome, older_than))

    def delete(self, job: int) -> None:
        self._run(calls.delete(job))

    def rerun(self, job: int) -> p.JobStatus:
        """Start a new job with ``job``'s argv, cwd, environment (as its start gave
        it), requested limits and labels; the caller owns it (its own jobs; an
        admin's any). Its status, as :meth:`start`'s. Protocol 1.2."""
        return self._run(calls.rerun(self.welcome, job))

    if TYPE_CHECKING:  # the overloads, for the type checker only (no typing at run time)
        @overload
        def stream(self, job: int, position: int = 0, *, timestamps: bool = False,
                   reconnect: float | None = core.RECONNECT_TIMEOUT,
                   resizes: Literal[False] = False) -> Iterator[p.OutputChunk | p.End]: ...

        @overload
        def stream(self, job: int, position: int = 0, *, timestamps: bool = False,
                   reconnect: float | None = core.RECONNECT_TIMEOUT,
                   resizes: bool) -> Iterator[core.StreamEvent]: ...

    def stream(self, job: int, position: int = 0, *, timestamps: bool = False,
               reconnect: float | None = core.RECONNECT_TIMEOUT,
               resizes: bool = False) -> Iterator[core.StreamEvent]:
        """The job's output from ``position`` (0: the first byte), following it
        live until the job ends. Yields OutputChunk events, then one End.

        ``reconnect`` (seconds; None or 0: never): when the connection breaks
        (or the server restarts), connect again with backoff and resume right
        after the last chunk received, so that nothing is lost or repeated;
        give up (ConnectionFailed) once that many seconds pass without the
        server. This client then carries on over the new connection. (By hand:
        connect again and pass the last chunk's position.) With
        ``timestamps``, each chunk is one read of jobd's and carries its
        ``time`` (a server older than protocol 1.1 sends no times: None). With
        ``resizes``, a terminal job's recorded resizes come too, as
        :class:`protocol.Resized` events in the log's order (protocol 1.2; an
        older server sends none).
        """
        within = core.check_reconnect(reconnect)
        if within is None:
            return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                     follow=True, resizes=resizes))
        return self._resuming(calls.Resume(job, position, timestamps, core.Outage(within),
                                           resizes))

    if TYPE_CHECKING:  # the overloads, for the type checker only (no typing at run time)
        @overload
        def output(self, job: int, position: int = 0, *, timestamps: bool = False,
                   resizes: Literal[False] = False) -> Iterator[p.OutputChunk | p.End]: ...

        @overload
        def output(self, job: int, position: int = 0, *, timestamps: bool = False,
                   resizes: bool) -> Iterator[core.StreamEvent]: ...

    def output(self, job: int, position: int = 0, *, timestamps: bool = False,
               resizes: bool = False) -> Iterator[core.StreamEvent]:
        """Like :meth:`stream`, but only the output that exists now."""
        return self._output(calls.output_request(self.welcome, job, position, timestamps,
                                                 follow=False, resizes=resizes))

    def attach(self, job: int, position: int | None = None, *,
               input: bool = False) -> BlockingAttach:
        """Attach to a job's output (from ``position``; None: a recent point the
        server picks; 0: the first byte) and, with ``input``, its stdin or
        terminal (the owner and admin may; protocol 1.2). Returns a
        :class:`BlockingAttach` (a context manager that detaches on exit)."""
        self._send(calls.attach_request(self.welcome, job, position, input))
        return BlockingAttach(self, job)

    def _output(self, request: p.Stream | p.Output) -> Iterator[core.StreamEvent]:
        return self._events(calls.output(request))


if TYPE_CHECKING:
    #: What ``run(stdin=...)`` takes: bytes, a binary file, or a file descriptor.
    Input = bytes | bytearray | memoryview | BinaryIO | int


def _blocks(source: Input) -> Iterator[bytes]:
    size = p.MAX_INPUT_CHUNK
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for at in range(0, len(view), size):
            yield bytes(view[at:at + size])
        return
    while True:
        block = os.read(source, size) if isinstance(source, int) else source.read(size)
        if not block:
            return
        yield block


class BlockingAttach:
    """An attach in progress (:meth:`BlockingClient.attach`).

    ``send``, ``close_input`` and ``resize`` go to the job (with ``input``);
    iterating yields the job's output (``OutputChunk``) until the ``End`` (the
    job ended, or :meth:`detach` was called), which is also kept in ``end``.
    ``poll()`` returns what has arrived without waiting, ``receive(timeout)``
    waits for one event; ``fileno()`` is the socket, for ``select`` (poll first:
    received bytes may wait decrypted in memory). Leaving the ``with`` block
    detaches, reads to the end, and leaves the connection ready for the next
    request.
    """

    def __init__(self, client: BlockingClient, job: int) -> None:
        self._client = client
        self.job = job
        self.end: p.End | None = None
        self._detached = False

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Input for the job (in frames of at most ``protocol.MAX_INPUT_CHUNK``)."""
        if type(data) is bytes and len(data) <= p.MAX_INPUT_CHUNK:
            if data:
                self._send(p.Input(data))  # one frame as it is (bulk input: no copy)
            return
        view = memoryview(data).cast("B")
        for at in range(0, len(view), p.MAX_INPUT_CHUNK):
            self._send(p.Input(bytes(view[at:at + p.MAX_INPUT_CHUNK])))

    def close_input(self) -> None:
        """The end of input: the job's stdin is closed (a terminal gets Ctrl-D)."""
        self._send(p.InputEof())

    def resize(self, rows: int, cols: int) -> None:
        self._send(core.message(p.Resize, rows, cols))

    def detach(self) -> None:
        """Leave the job running: the server ends the attach (iterate to the End)."""
        if not self._detached and self.end is None:
            self._detached = True
            self._send(p.Detach())

    def fileno(self) -> int:
        return self._client._sock.fileno()

    @property
    def liveness(self) -> float | None:
        """The longest the server may stay silent (it ticks meanwhile), or None."""
        return self._client._idle

    def _send(self, message: p.Message) -> None:
        if self.end is not None:
            return  # over: nothing more goes to the job
        self._client._send(message)

    def receive(self, timeout: float | None = None) -> p.OutputChunk | p.End | None:
        """The next event; None if none came within ``timeout`` (0: only what has
        arrived). After the End: the End again."""
        import select

        if self.end is not None:
            return self.end
        sock, conn = self._client._sock, self._client._conn
        while True:
            try:
                event = conn.next_event()
            except p.ProtocolError as exc:
                raise core.lost(exc) from None
            if event is not p.NEED_DATA:
                if isinstance(event, p.OutputChunk):
                    return event
                self.end = core.expect(event, p.End)
                return self.end
            try:
                count = sock.read_buffered(conn.get_buffer(core.RECEIVE_SIZE))
                if count is None:
                    if timeout is not None:
                        ready, _, _ = select.select([sock.fileno()], [], [], timeout)
                        if not ready:
                            return None
                    sock.settimeout(None)
                    sock.receive_more()
                    continue
            except (OSError, ssl.SSLError) as exc:
                raise core.lost(exc) from None
            if count:
                conn.buffer_updated(count)
            else:
                conn.receive_data(b"")

    def poll(self) -> list[p.OutputChunk | p.End]:
        """Every event that has arrived, without waiting."""
        events: list[p.OutputChunk | p.End] = []
        while self.end is None:
            event = self.receive(0)
            if event is None:
                break
            events.append(event)
        return events

    def __iter__(self) -> Iterator[p.OutputChunk | p.End]:
        while self.end is None:
            event = self.receive()
            assert event is not None
            yield event

    def __enter__(self) -> BlockingAttach:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.end is None and t is None:
            self.detach()
            for _ in self:
                pass


def connect_blocking(
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
) -> BlockingClient:
    """Connect, complete TLS 1.3, exchange hello and welcome.

    With ``pin`` (trust on first use, see :mod:`jobctl._trust`) instead of
    ``ca``, the server's certificate is checked against its pin right after
    the handshake, before anything is sent.

    ``liveness_timeout`` (seconds; None or 0: off): a request in progress
    fails with ConnectionFailed once the server has sent nothing for that long
    (it ticks while it works: a stream of a silent job, a stop), and TCP
    keepalive and TCP_USER_TIMEOUT notice a dead path as soon.
    """
    liveness = core.check_liveness(liveness_timeout)
    ctx = _context(certificate, key, ca, pin)
    try:
        raw = socket.create_connection((core.host_name(address), port),  # type: ignore[arg-type]
                                       timeout=connect_timeout)
    except OSError as exc:
        raise core.connect_error(address, port, exc) from None
    core.set_keepalive(raw, liveness)
    try:
        sock = TLSChannel(raw, ctx, core.host_name(server_name or address))
        sock.do_handshake()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raw.close()
        raise core.handshake_error(exc) from None
    try:
        # TOFU (issue 15): the pin, checked before the hello goes out, replaces the CA
        # and its purpose check; with a CA, the server must be for serverAuth.
        if pin is not None:
            pin.check(sock.peer_certificate(), raw.getpeername()[0])
        else:
            core.check_server_purpose(sock.peer_certificate())
    except BaseException:
        raw.close()
        raise
    conn = p.ClientConnection()
    try:
        sock.sendall(conn.send(core.hello(liveness)))
        welcome = _read_welcome(sock, conn, connect_timeout)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise core.refused_before_welcome(exc) from None
    except BaseException:
        sock.close()
        raise
    client = BlockingClient(sock, welcome, conn, core.idle_timeout(welcome, liveness))
    client._factory = lambda: connect_blocking(
        address, port, certificate=certificate, key=key, ca=ca, server_name=server_name,
        connect_timeout=connect_timeout, pin=pin, liveness_timeout=liveness_timeout)
    return client


def _context(certificate: str | os.PathLike[str], key: str | os.PathLike[str],
             ca: str | os.PathLike[str] | None, pin: Pinning | None) -> ssl.SSLContext:
    if pin is not None:
        return pin.context(certificate, key)
    if ca is None:
        raise ConfigError("no CA certificate given (and no pin: see jobctl._trust)")
    return core.client_context(certificate, key, ca)


def _read_welcome(sock: TLSChannel, conn: p.ClientConnection, timeout: float) -> p.Welcome:
    sock.settimeout(timeout)
    while True:
        try:
            event = conn.next_event()
        except p.ProtocolError:
            raise core.refused_before_welcome(None) from None
        if event is not p.NEED_DATA:
            return core.check_welcome(event)
        try:
            _receive_into(sock, conn)
        except TimeoutError:
            raise ConnectionFailed(f"no welcome from the server within {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise core.refused_before_welcome(exc) from None


def _receive_into(sock: TLSChannel, conn: p.ClientConnection) -> None:
    """Decrypted bytes straight into the connection's buffer (one TLS record, 16 KiB,
    at most), or the end; socket and TLS errors are the caller's to name."""
    try:
        count = sock.recv_into(conn.get_buffer(core.RECEIVE_SIZE))
    except ssl.SSLZeroReturnError:
        count = 0
    if count:
        conn.buffer_updated(count)
    else:
        conn.receive_data(b"")
