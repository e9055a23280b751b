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
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import protocol as p

from . import _core as core
from ._errors import ConnectionFailed

Argv = core.Argv

#: Bytes taken from the socket per read: many TLS records at once.
SOCKET_READ = 256 * 1024


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

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.sendall(self._outgoing.read())

    def _fill(self) -> None:
        self._flush()  # the handshake's flights, and any post-handshake answer
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

    def __init__(self, sock: TLSChannel, welcome: p.Welcome, conn: p.ClientConnection):
        self._sock = sock
        self._conn = conn
        self.welcome = welcome
        self.identity = welcome.identity
        self.role = welcome.role

    # -- connection -------------------------------------------------------------

    def _receive(self, timeout: float | None) -> Any:
        self._sock.settimeout(timeout)
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is not p.NEED_DATA:
                return event
            try:
                _receive_into(self._sock, conn)
            except TimeoutError:
                raise ConnectionFailed(f"no answer from the server within {timeout:g}s") from None
            except (OSError, ssl.SSLError) as exc:
                raise core.lost(exc) from None

    def _send(self, message: p.Message) -> None:
        try:
            self._sock.sendall(self._conn.send(message))
        except (OSError, ssl.SSLError) as exc:
            raise core.lost(exc) from None

    def _request(self, message: p.Message, kind: type[core.R],
                 timeout: float | None = core.REQUEST_TIMEOUT) -> core.R:
        self._send(message)
        try:
            return core.expect(self._receive(timeout), kind)
        except p.ProtocolError as exc:
            raise core.lost(exc) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------

    def start(self, argv: Argv, *, cwd: bytes | str | None = None,
              env: dict[bytes, bytes] | None = None, limits: p.Limits | None = None
              ) -> p.JobStatus:
        """Start a job. The status may be ``error`` (the command could not run)."""
        return self._request(core.start_request(argv, cwd, env, limits), p.Started).status

    def stop(self, job: int, grace: float | None = None) -> p.JobStatus:
        """Stop a job; returns once every process of it is gone."""
        return self._request(core.stop_request(job, grace), p.Stopped,
                             core.stop_timeout(grace)).status

    def status(self, job: int) -> p.JobStatus:
        return self._request(p.GetStatus(job), p.StatusResult).status

    def list(self) -> list[p.JobStatus]:
        jobs: list[p.JobStatus] = []
        after = 0
        while True:
            page = self._request(p.ListJobs(after), p.JobList)
            jobs.extend(page.jobs)
            if not page.more or not page.jobs:
                return jobs
            after = page.jobs[-1].id

    def delete(self, job: int) -> None:
        self._request(p.Delete(job), p.Deleted)

    def stream(self, job: int, position: int = 0) -> Iterator[p.OutputChunk | p.End]:
        """The job's output from ``position`` (0: the first byte), following it
        live until the job ends. Yields OutputChunk events, then one End.

        To resume after a lost connection, connect again and pass the position
        of the last chunk received: nothing is lost or repeated.
        """
        return self._output(p.Stream(job, position))

    def output(self, job: int, position: int = 0) -> Iterator[p.OutputChunk | p.End]:
        """Like :meth:`stream`, but only the output that exists now."""
        return self._output(p.Output(job, position))

    def _output(self, request: p.Stream | p.Output) -> Iterator[p.OutputChunk | p.End]:
        self._send(request)
        while True:
            try:
                # No deadline while a silent job writes nothing; TCP keepalive
                # notices a server that vanished.
                event = self._receive(None)
            except p.ProtocolError as exc:
                raise core.lost(exc) from None
            if isinstance(event, p.OutputChunk):
                yield event
                continue
            yield core.expect(event, p.End)
            return


def connect_blocking(
    address: str = core.DEFAULT_ADDRESS,
    port: int = core.DEFAULT_PORT,
    *,
    certificate: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    server_name: str | None = None,
    connect_timeout: float = core.CONNECT_TIMEOUT,
) -> BlockingClient:
    """Connect, complete TLS 1.3, exchange hello and welcome."""
    ctx = core.client_context(certificate, key, ca)
    try:
        raw = socket.create_connection((core.host_name(address), port),  # type: ignore[arg-type]
                                       timeout=connect_timeout)
    except OSError as exc:
        raise core.connect_error(address, port, exc) from None
    core.set_keepalive(raw)
    try:
        sock = TLSChannel(raw, ctx, core.host_name(server_name or address))
        sock.do_handshake()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raw.close()
        raise core.handshake_error(exc) from None
    conn = p.ClientConnection()
    try:
        sock.sendall(conn.send(p.Hello(software=core.SOFTWARE)))
        welcome = _read_welcome(sock, conn, connect_timeout)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise core.refused_before_welcome(exc) from None
    except BaseException:
        sock.close()
        raise
    return BlockingClient(sock, welcome, conn)


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
