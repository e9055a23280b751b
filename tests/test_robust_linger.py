"""Refusals reach a client that writes before it reads (issue 21 item 8).

jobd refuses a connection with a TLS alert (``unknown ca``, ``certificate
required``) or an error frame (no role). A client that sends its hello at
once, and more after it, has bytes that jobd never reads: closing with them
unread sends RST, and the client sees ``Broken pipe`` or a reset instead of
the reason. jobd lingers (jobd._linger): shuts down writing, drains, closes.

The client here waits, without a timer, until the server has ended its side
(``POLLRDHUP``: a FIN, or the RST of an abrupt close), then writes again and
only then reads: with a lingering close the write is accepted and the reason
is read; with an abrupt one the write fails with EPIPE or ECONNRESET.
"""

from __future__ import annotations

import select
import socket
import ssl

import pytest

import protocol as p

from .conftest import JobdProcess
from .hostile import HELLO

#: Far more than jobd reads before it refuses (one receive of the handshake, or the hello).
MORE = b"\0" * (512 * 1024)


def _context(jobd: JobdProcess, who: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(jobd.pki.path("ca.pem"))
    if who is not None:
        ctx.load_cert_chain(jobd.pki.path(f"{who}.pem"), jobd.pki.path(f"{who}.key"))
    return ctx


def _wait_server_done(sock: socket.socket, timeout: float = 30.0) -> None:
    """Until the server ended its side of the connection: FIN or RST arrived."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    assert poller.poll(timeout * 1000), "the server never ended the connection"


def _writes_first(jobd: JobdProcess, who: str | None) -> tuple[bool, bytes | Exception]:
    """Hello and more at once, wait for the server's end, write again, then read:
    (the second write was accepted, what the read returned or raised)."""
    raw = socket.create_connection((jobd.address, jobd.port), timeout=30)
    tls = _context(jobd, who).wrap_socket(raw, server_hostname="localhost")
    try:
        tls.sendall(HELLO + MORE)
        _wait_server_done(tls)
        try:
            tls.sendall(b"\0" * 1024)
            accepted = True
        except OSError:
            accepted = False
        try:
            data = bytearray()
            while chunk := tls.recv(65536):
                data += chunk
            return accepted, bytes(data)
        except (OSError, ssl.SSLError) as exc:
            return accepted, exc
    finally:
        tls.close()


@pytest.mark.parametrize(("who", "alert"), [("stranger", "UNKNOWN_CA"),
                                            (None, "CERTIFICATE_REQUIRED")])
def test_a_tls_refusal_reaches_a_client_that_wrote_first(jobd: JobdProcess, who: str | None,
                                                          alert: str) -> None:
    accepted, result = _writes_first(jobd, who)
    assert isinstance(result, ssl.SSLError), result
    assert alert in str(result), result
    assert accepted, "the server reset the connection instead of lingering"
    assert jobd.proc.poll() is None


def test_an_identity_refusal_reaches_a_client_that_wrote_first(jobd: JobdProcess) -> None:
    accepted, result = _writes_first(jobd, "norole")
    assert isinstance(result, bytes), result
    error = p.decode_payload(result[4:])
    assert isinstance(error, p.Error), error
    assert error.code is p.ErrorCode.PERMISSION_DENIED
    assert "certificate has no role" in error.message
    assert accepted, "the server reset the connection instead of lingering"
