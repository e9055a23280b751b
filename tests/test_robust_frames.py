"""Hostile frames against a real jobd over real TLS with a valid client certificate.

Every attack gets a clear error frame where the connection still allows one
(checked by decoding it with ``protocol``), the connection is closed, jobd's
memory does not jump, and a well-behaved client (:class:`Bystander`) working
the whole time notices nothing: its live stream gets every line, and it is
served before, during and after each attack (SPEC §4, §7).
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from cryptography import x509

import protocol as p

from .conftest import JobdProcess
from .hostile import (
    AMPLIFIER,
    AMPLIFIER_HELLO,
    HELLO,
    Bystander,
    RawTLS,
    Reply,
    attack,
    bystander,
    client_context,
    expect_error,
    frame,
    jobd,
    packed,
    rogue_certificate,
    start_frame,
    vm_rss,
)

__all__ = ["bystander", "jobd"]  # the fixtures

LIMIT = p.MAX_FRAME_SIZE
BAD = p.ErrorCode.BAD_REQUEST


def nested(depth: int) -> bytes:
    """A status request whose unknown field nests *depth* arrays (valid msgpack)."""
    body = b"\x91" * depth + b"\xc0"
    return frame(b"\x83\xa4type\xa6status\xa3job\x01\xa5extra" + body)


# (name, bytes after the hello, error code, fragments of the message)
AFTER_HELLO: list[tuple[str, bytes, p.ErrorCode, tuple[str, ...]]] = [
    ("4 GiB length prefix", b"\xff\xff\xff\xff", p.ErrorCode.LIMIT_EXCEEDED,
     ("frame of 4294967295 bytes exceeds the frame limit of 1048576",)),
    ("prefix over the limit, then data", frame(b"\0" * 65536, length=LIMIT + 1),
     p.ErrorCode.LIMIT_EXCEEDED, (f"frame of {LIMIT + 1} bytes exceeds",)),
    ("empty frame", frame(b""), BAD, ("empty frame",)),
    ("an array, not a map", packed([1, 2, 3]), BAD, ("a frame must hold a map, not an array",)),
    ("a string, not a map", packed("status"), BAD, ("a frame must hold a map, not a string",)),
    ("nil, not a map", packed(None), BAD, ("not nil",)),
    ("invalid msgpack", frame(b"\xc1"), BAD, ("invalid msgpack",)),
    ("invalid msgpack inside a map", frame(b"\x81\xa4type\xc1"), BAD, ("invalid msgpack",)),
    ("invalid UTF-8", frame(b"\x81\xa4type\xa2\xff\xfe"), BAD, ("not valid UTF-8",)),
    ("array claiming 4 billion elements", frame(b"\xdd\xff\xff\xff\xff\x01"), BAD,
     ("truncated msgpack",)),
    ("map claiming 4 billion entries", frame(b"\xdf\xff\xff\xff\xff\xa4type"), BAD,
     ("truncated msgpack",)),
    ("bin claiming 4 GiB", frame(b"\x82\xa4type\xa6status\xa3job\xc6\xff\xff\xff\xff"), BAD,
     ("truncated msgpack",)),
    ("str claiming 4 GiB", frame(b"\x81\xa4type\xdb\xff\xff\xff\xff"), BAD,
     ("truncated msgpack",)),
    ("argv claiming 4 billion entries",
     frame(b"\x82\xa4type\xa5start\xa4argv\xdd\xff\xff\xff\xff"), BAD, ("truncated msgpack",)),
    ("nesting 100,000 deep", nested(100_000), BAD, ("nesting deeper than",)),
    ("nesting 17 deep", nested(17), BAD, ("nesting deeper than 16 levels",)),
    ("trailing bytes", frame(msgpack.packb({"type": "list"}) + b"\x00"), BAD,
     ("trailing bytes",)),
    ("extension type", frame(b"\x82\xa4type\xa4list\xa1x\xd4\x05\x00"), BAD,
     ("extension type 5",)),
    ("timestamp extension", frame(b"\x82\xa4type\xa4list\xa1x\xd6\xff\x00\x00\x00\x00"), BAD,
     ("extension type -1",)),
    ("integer map key", packed({"type": "list", 1: 2}), BAD, ("map keys must be strings",)),
    ("no type", packed({"job": 1}), BAD, ("must have a string 'type'",)),
    ("type not a string", packed({"type": 7}), BAD, ("must have a string 'type'",)),
    ("unknown message type", packed({"type": "frobnicate"}), BAD,
     ("unknown message type 'frobnicate'",)),
    ("a server message from the client", p.encode_frame(p.Error(BAD, "hi")), BAD,
     ("a client cannot send 'error'",)),
    ("job id as a string", packed({"type": "status", "job": "1"}), BAD,
     ("bad 'status' message", "'job' must be an integer")),
    ("job id negative", packed({"type": "status", "job": -1}), BAD, ("must not be negative",)),
    ("job id a boolean", packed({"type": "status", "job": True}), BAD,
     ("'job' must be an integer",)),
    ("job id missing", packed({"type": "stop"}), BAD, ("missing field 'job'",)),
    ("argv not an array", packed({"type": "start", "argv": b"ls"}), BAD,
     ("'argv' must be an array",)),
    ("argv of strings", packed({"type": "start", "argv": ["ls"]}), BAD,
     ("argv entries must be bytes",)),
    ("argv empty", packed({"type": "start", "argv": []}), BAD, ("argv must not be empty",)),
    ("argv with NUL", packed({"type": "start", "argv": [b"l\0s"]}), BAD, ("NUL",)),
    ("env not pairs", start_frame(env=[[b"A"]]), BAD,
     ("pairs",)),
    ("grace not a number", packed({"type": "stop", "job": 1, "grace": "soon"}), BAD,
     ("'grace' must be a number",)),
    ("grace infinite", packed({"type": "stop", "job": 1, "grace": float("inf")}), BAD,
     ("finite",)),
    ("position a float", packed({"type": "stream", "job": 1, "position": 1.5}), BAD,
     ("'position' must be an integer",)),
    ("limits not a map", start_frame(limits=[1]), BAD,
     ("'limits' must be a map",)),
    # request bounds (protocol/_bounds.py, issue 13): refused while decoding
    ("decode amplification: 1 MiB of empty arrays", AMPLIFIER, BAD,
     ("an array of 1048551 elements exceeds the request limit of 8192",)),
    ("many small arrays", packed({"type": "status", "job": 1, "x": [[[]] * 4000] * 60}),
     BAD, ("arrays, maps and elements",)),
    ("a map of 1000 entries", packed({"type": "list", "x": {str(i): 0 for i in range(1000)}}),
     BAD, ("a map of 1000 entries exceeds the request limit of 64",)),
    ("a string of 64 KiB", packed({"type": "list", "x": "s" * 65536}), BAD,
     ("a string of 65536 bytes exceeds the request limit of 4095",)),
    ("cwd of 1 MiB", start_frame(cwd=b"/" + b"d" * (LIMIT - 100)), BAD,
     ("exceeds the request limit of 262144",)),
    ("cwd over PATH_MAX", start_frame(cwd=b"/" * 5000),
     BAD, ("cwd of 5000 bytes is longer than 4095",)),
    ("argv entry over MAX_ARG_STRLEN", packed({"type": "start", "argv": [b"x" * 131072]}),
     BAD, ("an argv entry of 131072 bytes is longer than 131071",)),
    ("argv over 256 KiB", packed({"type": "start", "argv": [b"x" * 100_000] * 3}), BAD,
     ("command line longer than 262144 bytes",)),
    ("9000 arguments", packed({"type": "start", "argv": [b""] * 9000}), BAD,
     ("an array of 9000 elements exceeds the request limit of 8192",)),
    ("5000 environment variables",
     start_frame(env=[[b"V%d" % i, b""] for i in range(5000)]), BAD,
     ("env has 5000 entries, more than 4096",)),
    ("cpus +inf", start_frame(limits={"cpus": float("inf")}),
     BAD, ("cpus must be a finite positive number",)),
    ("cpus nan", start_frame(limits={"cpus": float("nan")}),
     BAD, ("cpus must be a finite positive number",)),
    ("memory 2**64-1", start_frame(limits={"memory": 2**64 - 1}), BAD,
     ("memory must be at most",)),
    ("17 devices", start_frame(limits={
        "io_read_bps": [[f"/dev/d{i}", 1] for i in range(17)]}), BAD,
     ("io_read_bps has 17 entries, more than 16 per direction",)),
    ("one device under two names", start_frame(limits={
        "io_write_bps": [["/dev/null", 1], ["/dev/././null", 1]]}), BAD,
     ("io_write_bps: /dev/null is given more than once",)),
    ("a second hello", HELLO, BAD, ("hello",)),
    ("two requests at once", p.encode_frame(p.ListJobs()) * 2, BAD,
     ("request while another is in progress",)),
]


@pytest.mark.parametrize(("name", "data", "code", "fragments"), AFTER_HELLO,
                         ids=[case[0] for case in AFTER_HELLO])
def test_hostile_frame_after_hello(jobd: JobdProcess, bystander: Bystander, name: str,
                                   data: bytes, code: p.ErrorCode,
                                   fragments: tuple[str, ...]) -> None:
    expect_error(attack(jobd, data), code, *fragments)
    bystander.check()


def test_pipelined_requests_are_refused_every_time(jobd: JobdProcess, bystander: Bystander,
                                                   tmp_path: Path) -> None:
    """Two requests in one write: always a protocol error, and the first is never carried
    out (whichever of jobd's tasks happens to run first)."""
    for i in range(30):
        marker = tmp_path / f"pipelined-{i}"
        start = p.encode_frame(p.Start((b"touch", str(marker).encode())))
        reply = attack(jobd, start + p.encode_frame(p.ListJobs()))
        expect_error(reply, BAD, "request while another is in progress")
        assert not marker.exists()
    with RawTLS.to(jobd) as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.ListJobs()))
        listing = conn.next_message(10)
        assert isinstance(listing, p.JobList)
        assert not any(b"touch" in s.argv for s in listing.jobs)
    bystander.check()


BEFORE_HELLO: list[tuple[str, bytes, p.ErrorCode, tuple[str, ...]]] = [
    ("4 GiB length prefix", b"\xff\xff\xff\xff", p.ErrorCode.LIMIT_EXCEEDED,
     ("exceeds the frame limit",)),
    ("prefix over the limit, then data", frame(b"x" * 4096, length=LIMIT + 1),
     p.ErrorCode.LIMIT_EXCEEDED, ("exceeds the frame limit",)),
    ("a request before the hello", p.encode_frame(p.GetStatus(1)), BAD, ("expected hello",)),
    ("a start before the hello", p.encode_frame(p.Start((b"touch", b"/tmp/x"))), BAD,
     ("expected hello",)),
    ("invalid msgpack", frame(b"\xc1\xc1"), BAD, ("invalid msgpack",)),
    ("a map claiming 4 billion entries", frame(b"\xdf\xff\xff\xff\xff"), BAD,
     ("truncated msgpack",)),
    ("decode amplification as the hello", AMPLIFIER_HELLO, BAD,
     ("an array of 1048546 elements exceeds the request limit",)),
    ("hello with a string version", packed({"type": "hello", "version": "1"}), BAD,
     ("'version' must be an integer",)),
    ("hello of another major version", p.encode_frame(p.Hello(version=2)),
     p.ErrorCode.UNSUPPORTED_VERSION, ("unsupported protocol version 2",)),
    ("random bytes", bytes(range(256)) * 4, BAD, ()),
    # the client must wait for the welcome (docs/protocol.md, "client rules")
    ("a request pipelined with the hello", HELLO + p.encode_frame(p.ListJobs()), BAD,
     ("request before the welcome",)),
    ("garbage right after the hello", HELLO + b"\xff\xff\xff\xff", BAD,
     ("request before the welcome",)),
]


@pytest.mark.parametrize(("name", "data", "code", "fragments"), BEFORE_HELLO,
                         ids=[case[0] for case in BEFORE_HELLO])
def test_hostile_frame_before_hello(jobd: JobdProcess, bystander: Bystander, name: str,
                                    data: bytes, code: p.ErrorCode,
                                    fragments: tuple[str, ...]) -> None:
    if name == "random bytes":  # 0x00010203 = 66051 bytes: a frame waiting for its payload
        data = b"\x7f\xff\xff\xff" + data
        code = p.ErrorCode.LIMIT_EXCEEDED
    expect_error(attack(jobd, data, hello=False), code, *fragments)
    jobd.wait_for_log(r"warning bad-hello ")
    bystander.check()


@pytest.mark.parametrize(
    ("name", "data", "hello"),
    [
        ("half a length prefix", b"\x00\x00", False),
        ("half a length prefix after the hello", b"\x00\x00", True),
        ("a truncated payload", frame(b"\x81\xa4type\xa4list")[:-3], True),
        ("a truncated hello", HELLO[:-1], False),
        ("a payload 1 MiB short", frame(b"x" * 100, length=LIMIT), True),
    ],
)
@pytest.mark.parametrize("how", ["close_notify", "tcp_eof"])
def test_truncated_then_eof(jobd: JobdProcess, bystander: Bystander, name: str, data: bytes,
                            hello: bool, how: str) -> None:
    """A frame cut short by the peer's EOF: nobody left to tell, the connection just closes
    (TLS close_notify: jobd answers with its own; a bare TCP EOF: jobd closes too)."""
    # jobd's handshake timeout is 10 s: closing within 5 s is noticing the EOF.
    with RawTLS.to(jobd) as conn:
        if hello:
            conn.hello()
        assert conn.send(data)
        if how == "close_notify":
            assert conn.close_notify(timeout=20), "jobd did not close cleanly"
        else:
            conn.half_close()
            reply = conn.read_until_closed(timeout=20)
            assert reply.closed and reply.messages == []
    if how == "close_notify":
        jobd.wait_for_log("connection closed in the middle of a frame")
    bystander.check()


def test_stream_then_second_request(jobd: JobdProcess, bystander: Bystander) -> None:
    """One request at a time: a request sent while a stream runs is a protocol error;
    the stream stops, the error frame says why, the job itself is not disturbed."""
    with RawTLS.to(jobd) as conn:
        conn.hello()
        script = "i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); sleep 0.01; done"
        assert conn.send(p.encode_frame(p.Start((b"sh", b"-c", script.encode()))))
        started = conn.next_message(10)
        assert isinstance(started, p.Started), started
        job = started.status.id
        assert conn.send(p.encode_frame(p.Stream(job)))
        first = conn.next_message(10)
        assert isinstance(first, p.OutputChunk), first
        assert conn.send(p.encode_frame(p.GetStatus(job)))
        reply = conn.read_until_closed()
    assert all(isinstance(m, p.OutputChunk) for m in reply.messages[:-1])
    expect_error(reply, BAD, "request while another is in progress")
    jobd.wait_for_log(r"bad-request .*request while another is in progress")
    # the job runs on, and can be stopped by its owner
    with RawTLS.to(jobd) as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.Stop(job, 0)))
        stopped = conn.next_message(20)
        assert isinstance(stopped, p.Stopped) and stopped.status.describe() == "stopped"
    bystander.check()


def test_request_level_errors_keep_the_connection(jobd: JobdProcess,
                                                  bystander: Bystander) -> None:
    """Well-formed requests the server refuses are answered, and the connection goes on."""
    with RawTLS.to(jobd) as conn:
        conn.hello()
        cases: list[tuple[p.Message, p.ErrorCode, str]] = [
            (p.Start((b"true",), limits=p.Limits(cpus=0.001)), p.ErrorCode.LIMIT_EXCEEDED,
             "below the kernel's minimum"),
            (p.GetStatus(2**64 - 1), p.ErrorCode.NOT_FOUND, "process not found"),
            (p.Stream(2**64 - 1, 2**64 - 1), p.ErrorCode.NOT_FOUND, "process not found"),
            (p.Stream(bystander.job, 2**64 - 1), p.ErrorCode.NOT_FOUND, "process not found"),
        ]
        for request, code, fragment in cases:
            assert conn.send(p.encode_frame(request))
            answer = conn.next_message(10)
            assert isinstance(answer, p.Error) and answer.code is code, (request, answer)
            assert fragment in answer.message, answer
        # a valid request sent one byte at a time is served
        for byte in p.encode_frame(p.ListJobs()):
            assert conn.send(bytes([byte]))
        assert isinstance(conn.next_message(10), p.JobList)
        # a bad position inside the bystander's (visible to admin only) log
    with RawTLS.to(jobd, "root") as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.Output(bystander.job, 3)))
        answer = conn.next_message(10)
        assert isinstance(answer, p.Error) and answer.code is BAD, answer
        assert "bad position" in answer.message
    bystander.check()


def test_memory_does_not_jump_under_repeated_attacks(jobd: JobdProcess,
                                                     bystander: Bystander) -> None:
    """The heaviest attacks, many times over: jobd's resident memory stays put."""
    heavy = [
        b"\xff\xff\xff\xff",
        frame(b"\0" * 65536, length=LIMIT + 1),
        frame(b"\xdd\xff\xff\xff\xff" + b"\0" * (LIMIT - 5)),  # a whole 1 MiB frame
        nested(200_000),
        frame(b"\xdf\xff\xff\xff\xff"),
        AMPLIFIER,
    ]
    attack(jobd, heavy[2])  # warm up: the first full-size buffer
    before = vm_rss(jobd.proc.pid)
    for round_ in range(8):
        for data in heavy:
            reply = attack(jobd, data, hello=bool(round_ % 2))
            assert reply.closed and len(reply.errors) == 1, reply
        bystander.check()
    after = vm_rss(jobd.proc.pid)
    assert after - before < 30 * 2**20, (before, after)


def test_self_signed_and_forged_client_certificates_are_refused(
        jobd: JobdProcess, bystander: Bystander, tmp_path: Path) -> None:
    """A self-signed certificate naming an admin, and one that claims the real CA as its
    issuer without its key: refused at TLS, exit 3, logged, and nothing else disturbed."""
    pki = jobd.pki
    ca_name = x509.load_pem_x509_certificate(Path(pki.path("ca.pem")).read_bytes()).subject
    rogue_certificate(tmp_path, "selfie")
    rogue_certificate(tmp_path, "forger", issuer=ca_name)
    for name in ("selfie", "forger"):
        args = ["-c", str(tmp_path / f"{name}.pem"), "-k", str(tmp_path / f"{name}.key")]
        result = jobd.jobctl("alice", "start", "touch", str(tmp_path / "pwned"), extra=args)
        assert result.returncode == 3, result
        err = result.stderr.decode()
        assert err.startswith("server refused the connection: TLS alert: "), err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "pwned").exists()
    jobd.wait_for_log(r"connection-refused .*reason=\"?self.signed certificate")
    jobd.wait_for_log(r"connection-refused .*reason=\"?certificate signature failure")
    bystander.check()


def test_no_tls_session_resumption(jobd: JobdProcess, bystander: Bystander) -> None:
    """Every connection shows its certificate: jobd sends no TLS 1.3 session ticket, so a
    client cannot resume a session (a resumed session skips the certificate check: an
    expired or revoked certificate would keep getting in for the ticket's lifetime)."""
    ctx = client_context(jobd.pki)
    with RawTLS(jobd.address, jobd.port, ctx) as first:
        first.hello()  # tickets, if any, arrive after the handshake: read past them
        assert first.send(p.encode_frame(p.ListJobs()))
        assert isinstance(first.next_message(10), p.JobList)
        session = first.tls.session
        assert first.close_notify()  # a clean close: OpenSSL drops the session otherwise
    assert session is not None and not session.has_ticket
    with RawTLS(jobd.address, jobd.port, ctx, session=session) as second:
        assert not second.tls.session_reused
        assert second.hello().identity == "alice"
    bystander.check()


@pytest.mark.parametrize("request_kind", ["start", "stop"])
def test_garbage_during_a_one_shot_request(jobd: JobdProcess, bystander: Bystander,
                                           tmp_path: Path, request_kind: str) -> None:
    """Junk sent (in its own TLS record) while a start or a stop is being carried out: a
    protocol error, and the request still completes cleanly: the job it started runs to
    its end under supervision, the job it stops is stopped; jobd logs no failure."""
    with RawTLS.to(jobd) as conn:
        conn.hello()
        if request_kind == "stop":
            script = b"trap '' INT; echo ready; while :; do sleep 0.05; done"
            assert conn.send(p.encode_frame(p.Start((b"sh", b"-c", script))))
            started = conn.next_message(10)
            assert isinstance(started, p.Started)
            job = started.status.id
            request: p.Message = p.Stop(job, 0.3)
        else:
            request = p.Start((b"touch", str(tmp_path / "touched").encode()))
        assert conn.send(p.encode_frame(request))
        assert conn.send(b"\xff\xff\xff\xff")
        reply = conn.read_until_closed()
    # during the request: "request while another is in progress"; after it: a bad frame
    answers = [m for m in reply.messages if not isinstance(m, p.Started | p.Stopped)]
    error = expect_error(Reply(answers, reply.closed), reply.only_error().code)
    assert error.code in (BAD, p.ErrorCode.LIMIT_EXCEEDED), error
    with RawTLS.to(jobd, "root") as conn:
        conn.hello()
        if request_kind == "start":
            assert conn.send(p.encode_frame(p.ListJobs()))
            listing = conn.next_message(10)
            assert isinstance(listing, p.JobList)
            job = max(s.id for s in listing.jobs if s.argv[0] == b"touch")
        assert conn.send(p.encode_frame(p.Stream(job)))  # ends when the job has ended
        while isinstance(event := conn.next_message(10), p.OutputChunk):
            pass
        assert isinstance(event, p.End), event
        expected = "stopped" if request_kind == "stop" else "exited: 0"
        assert event.status.describe() == expected
    assert "connection-failed" not in jobd.log_text()
    bystander.check()
