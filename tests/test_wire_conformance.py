"""docs/protocol.md as an independent client reads it: raw frames against a real jobd.

Each test here is one of the points an independent client (written from the
docs alone) found the server disagreeing with them: nil in optional fields,
the shutdown notice, a limit the machine cannot enforce.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p

from .conftest import JobdProcess, Pki, start_jobd
from .hostile import RawTLS, packed


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobdProcess]:
    jobd = start_jobd(pki, tmp_path_factory.mktemp("conformance") / "state")
    try:
        yield jobd
    finally:
        assert jobd.stop() == 0


def _ask(conn: RawTLS, request: dict[str, object]) -> list[p.Message]:
    """Send one request; the frames of its answer (through the end frame of a stream)."""
    assert conn.send(packed(request))
    out: list[p.Message] = []
    while True:
        message = conn.next_message(20.0)
        assert message is not None, f"no answer to {request}"
        out.append(message)
        if not isinstance(message, p.OutputChunk):
            return out


def test_hello_with_nil_optional_fields_is_welcomed(server: JobdProcess) -> None:
    with RawTLS.to(server) as conn:
        assert conn.send(packed({"type": "hello", "version": 1, "minor": None,
                                 "software": None}))
        welcome = conn.next_message(10.0)
        assert isinstance(welcome, p.Welcome), welcome
        assert welcome.identity == "alice"


def test_requests_with_nil_optional_fields_are_answered(server: JobdProcess) -> None:
    with RawTLS.to(server) as conn:
        conn.hello()
        [started] = _ask(conn, {"type": "start", "argv": [b"echo", b"hi"], "cwd": None,
                                "env": None, "limits": {"isolate": None, "memory": None,
                                                        "io_read_bps": None}})
        assert isinstance(started, p.Started), started
        job = started.status.id
        *chunks, end = _ask(conn, {"type": "stream", "job": job, "position": None})
        assert isinstance(end, p.End), end
        assert b"".join(c.data for c in chunks if isinstance(c, p.OutputChunk)) == b"hi\n"
        *chunks, end = _ask(conn, {"type": "output", "job": job, "position": None})
        assert isinstance(end, p.End) and chunks, end
        [listing] = _ask(conn, {"type": "list", "after": None})
        assert isinstance(listing, p.JobList), listing
        assert job in [s.id for s in listing.jobs]
        [stopped] = _ask(conn, {"type": "stop", "job": job, "grace": None})
        assert isinstance(stopped, p.Error) and stopped.code is p.ErrorCode.INVALID_STATE


def test_a_required_field_that_is_nil_is_a_bad_request(server: JobdProcess) -> None:
    with RawTLS.to(server) as conn:
        conn.hello()
        [reply] = _ask(conn, {"type": "status", "job": None})
        assert isinstance(reply, p.Error) and reply.code is p.ErrorCode.BAD_REQUEST


def test_a_device_the_machine_lacks_is_a_permanent_error(server: JobdProcess) -> None:
    """Not ``unavailable``, which protocol.md §6 defines as temporary (retry later)."""
    with RawTLS.to(server) as conn:
        conn.hello()
        [reply] = _ask(conn, {"type": "start", "argv": [b"true"],
                              "limits": {"io_read_bps": [["/dev/nosuchdevice", 1 << 20]]}})
        assert isinstance(reply, p.Error), reply
        assert reply.code is p.ErrorCode.BAD_REQUEST, reply
        assert "cannot enforce" in reply.message
        # The connection stays open for the next request.
        [reply] = _ask(conn, {"type": "list"})
        assert isinstance(reply, p.JobList)


def test_a_zero_length_frame_is_a_bad_request_then_close(server: JobdProcess) -> None:
    with RawTLS.to(server) as conn:
        conn.hello()
        assert conn.send(b"\0\0\0\0")
        reply = conn.read_until_closed(20.0)
        assert reply.closed
        [error] = reply.errors
        assert error.code is p.ErrorCode.BAD_REQUEST


def test_the_handshake_timeout_ends_in_a_bare_eof(pki: Pki, tmp_path: Path) -> None:
    jobd = start_jobd(pki, tmp_path / "state", "--handshake-timeout", "0.5")
    try:
        with RawTLS.to(jobd) as conn:  # TLS done, no hello: the deadline passes
            reply = conn.read_until_closed(30.0)
            assert reply.closed and reply.messages == [] and reply.garbage == b""
        jobd.wait_for_log("connection-timeout")
    finally:
        assert jobd.stop() == 0


def test_shutdown_tells_idle_and_hello_phase_connections(pki: Pki, tmp_path: Path) -> None:
    jobd = start_jobd(pki, tmp_path / "state")
    bye = p.Error(p.ErrorCode.UNAVAILABLE, "server is shutting down")
    try:
        with RawTLS.to(jobd) as idle, RawTLS.to(jobd) as waiting, \
                RawTLS.to(jobd) as streaming:
            streaming.hello()
            [started] = _ask(streaming, {"type": "start",
                                         "argv": [b"sh", b"-c", b"echo up; exec sleep 600"]})
            assert isinstance(started, p.Started)
            assert streaming.send(packed({"type": "stream", "job": started.status.id}))
            first = streaming.next_message(20.0)
            assert isinstance(first, p.OutputChunk) and first.data == b"up\n"
            idle.hello()
            [reply] = _ask(idle, {"type": "list"})  # a request done: now idle
            assert isinstance(reply, p.JobList)
            # "waiting" finished TLS but has sent no hello. Make sure jobd holds it
            # in the hello phase (not still in the TLS handshake) before SIGTERM:
            # a third connection's whole exchange completes after it was accepted.
            with RawTLS.to(jobd) as third:
                third.hello()
            jobd.proc.terminate()
            for conn in (idle, waiting):
                got = conn.read_until_closed(30.0)
                assert got.closed and got.messages == [bye], (conn is idle, got)
            # A stream first ends with the job's final status, then the goodbye.
            got = streaming.read_until_closed(30.0)
            assert got.closed and got.messages[-1] == bye, got
            end = got.messages[-2]
            assert isinstance(end, p.End) and end.status.state is p.JobState.STOPPED
        assert jobd.proc.wait(30) == 0
    finally:
        jobd.stop()
