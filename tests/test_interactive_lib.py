"""Interactive jobs through the client library and a real jobd: stdin, terminals,
attach with several clients, roles, backpressure (protocol minor 2)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random

import msgpack
import pytest

import jobctl
import protocol as p

from .conftest import JobdProcess

TIMEOUT = 30.0


def connect(jobd: JobdProcess, who: str = "alice") -> jobctl.BlockingClient:
    return jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                   **jobd.pki.files(who))


def read_until(session: jobctl.BlockingAttach, pattern: bytes) -> bytes:
    got = b""
    while pattern not in got:
        event = session.receive(TIMEOUT)
        assert event is not None, f"no {pattern!r} within {TIMEOUT}s: {got!r}"
        assert isinstance(event, p.OutputChunk), f"ended without {pattern!r}: {got!r}"
        got += event.data
    return got


def test_run_with_stdin_is_binary_exact(jobd: JobdProcess) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 3)
    out = bytearray()
    with connect(jobd) as client:
        status = client.run(["sha256sum"], stdin=payload, on_output=lambda c: out.extend(c.data))
        assert status.state is p.JobState.EXITED and status.exit_code == 0
        assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        # The connection is good for more requests after the attach.
        assert client.status(status.id).stdin


def test_without_stdin_the_job_reads_nothing(jobd: JobdProcess) -> None:
    out = bytearray()
    with connect(jobd) as client:
        status = client.run(["sh", "-c", "cat; echo end"], on_output=lambda c: out.extend(c.data))
    assert status.exit_code == 0 and bytes(out) == b"end\n"


def test_terminal_session_detach_reattach_and_an_observer(jobd: JobdProcess) -> None:
    with connect(jobd) as alice, connect(jobd, "olga") as olga, connect(jobd, "bob") as bob:
        job = alice.start(["bash", "--norc", "--noprofile", "-i"],
                          tty=p.Terminal(30, 90, "xterm"), env={"PS1": "$ "}, env_merge=True)
        assert job.tty == p.Terminal(30, 90, "xterm") and job.stdin
        with alice.attach(job.id, 0, input=True) as session:
            read_until(session, b"$ ")  # bash may discard what is typed before its prompt
            session.send(b"echo $((6*7))\r")
            read_until(session, b"42")
            session.resize(40, 100)
            session.send(b"stty size\r")
            read_until(session, b"40 100")
        assert session.end is not None and session.end.status.running  # detached
        # An observer watches the same screen, and may not type.
        with pytest.raises(jobctl.PermissionDenied, match="may not type"):
            olga.attach(job.id, input=True).receive(TIMEOUT)
        watcher = olga.attach(job.id)
        # Another control user cannot even see the job.
        with pytest.raises(jobctl.NotFound):
            bob.attach(job.id).receive(TIMEOUT)
        with alice.attach(job.id, input=True) as again:
            again.send(b"echo again-$((1+1))\r")
            read_until(again, b"again-2")
            read_until(watcher, b"again-2")
            again.send(b"exit 3\r")
            for _ in again:
                pass
        assert again.end is not None and again.end.status.exit_code == 3
        for _ in watcher:
            pass
        assert watcher.end is not None and watcher.end.status.exit_code == 3


def test_input_needs_a_job_started_for_it(jobd: JobdProcess) -> None:
    with connect(jobd) as client:
        job = client.start(["sleep", "100"])
        with pytest.raises(jobctl.InvalidState, match="no input"):
            client.attach(job.id, input=True).receive(TIMEOUT)
        # Read-only attach to a plain job works; input frames in it are refused.
        session = client.attach(job.id)
        session.send(b"x")
        with pytest.raises(jobctl.JobctlError, match="read-only"):
            session.receive(TIMEOUT)
        client.stop(job.id, grace=0)


def test_a_job_that_never_reads_stalls_only_its_writer(jobd: JobdProcess) -> None:
    with connect(jobd) as writer_conn, connect(jobd) as other:
        job = writer_conn.start(["sleep", "1000"], stdin=True)
        session = writer_conn.attach(job.id, input=True)
        sock = session._client._sock._raw
        sock.setblocking(False)
        pushed = 0
        try:
            while pushed < 64 * 1024 * 1024:  # far more than every buffer on the way
                frame = session._client._conn.send(p.Input(b"y" * 65536))
                session._client._sock._tls.write(frame)
                data = session._client._sock._outgoing.read()
                sock.send(data)  # raises once the kernel's buffers are full
                pushed += len(frame)
        except BlockingIOError:
            pass
        assert pushed < 64 * 1024 * 1024
        # The server answers others at once, and the same job's status too.
        assert other.status(job.id).running
        assert other.run(["echo", "fine"], on_output=lambda c: None).exit_code == 0
        other.stop(job.id, grace=0)


def _send_cut(client: jobctl.BlockingClient, wire: bytes, cuts: list[int]) -> None:
    """``wire`` over the client's TLS in pieces of the sizes ``cuts`` cycles through:
    each piece is its own TLS record(s), so records end anywhere in a frame."""
    at = 0
    for size in itertools.cycle(cuts):
        if at >= len(wire):
            return
        client._sock.sendall(wire[at:at + size])
        at += size


def test_input_cut_anywhere_by_tls_records_arrives_exact(jobd: JobdProcess) -> None:
    """jobd's reader decrypts every record a socket read brought and reads exactly
    the rest of each frame (issue 24): frames cut anywhere by TLS records (a length
    prefix split, many frames in one record, a record ending one frame and starting
    the next, frames of every size up to the largest) reach the job exact."""
    rng = random.Random(24)
    sizes = [1, 2, 3, 4, 5, 16379, 16384, 16385, p.MAX_INPUT_CHUNK, 65536, 7,
             *(rng.randrange(1, p.MAX_INPUT_CHUNK + 1) for _ in range(16))]
    parts = [rng.randbytes(n) for n in sizes]
    with connect(jobd) as client:
        job = client.start(["sha256sum"], stdin=True)
        session = client.attach(job.id, 0, input=True)
        conn = client._conn
        wire = b"".join(conn.send(p.Input(part)) for part in parts) + conn.send(p.InputEof())
        _send_cut(client, wire, [1, 2, 3, 5, 4093, 16384, 16385, 70001, 300000, 9])
        out = b"".join(e.data for e in session if isinstance(e, p.OutputChunk))
        assert session.end is not None and session.end.status.exit_code == 0
        assert out.split()[0].decode() == hashlib.sha256(b"".join(parts)).hexdigest()
        assert client.status(job.id).exit_code == 0  # the connection goes on


def _frame(wire: dict[str, object]) -> bytes:
    raw = msgpack.packb(wire)
    return len(raw).to_bytes(4, "big") + raw


@pytest.mark.parametrize(("frame", "code", "fragment"), [
    # a length prefix over the frame limit, refused before its payload arrives
    ((p.MAX_FRAME_SIZE + 1).to_bytes(4, "big"), p.ErrorCode.LIMIT_EXCEEDED, "frame limit"),
    # an input frame one byte over the largest (the general decoder's refusal)
    (_frame({"type": "input", "data": b"z" * (p.MAX_INPUT_CHUNK + 1)}),
     p.ErrorCode.BAD_REQUEST, "exceeds the request limit"),
], ids=["length-over-frame-limit", "input-over-chunk-limit"])  # short: pytest puts the id
# in PYTEST_CURRENT_TEST, and an id of the 256 KiB frame made every exec fail (E2BIG)
def test_input_bounds_hold_behind_good_input_in_the_same_records(
        jobd: JobdProcess, frame: bytes, code: p.ErrorCode, fragment: str) -> None:
    """A bad frame that arrives in the same TLS records as good input (decrypted in
    one burst) is refused as ever, with its reason; the job and the server go on."""
    with connect(jobd) as client, connect(jobd) as other:
        # A job that prints nothing: the refusal is then the only thing coming back.
        job = client.start(["sh", "-c", "cat > /dev/null"], stdin=True)
        session = client.attach(job.id, 0, input=True)
        conn = client._conn
        good = b"".join(conn.send(p.Input(b"g" * 100_000)) for _ in range(3))
        _send_cut(client, good + frame, [50_000])
        with pytest.raises(jobctl.ServerError) as caught:
            for _ in session:
                pass
        assert caught.value.code is code and fragment in caught.value.message
        assert other.status(job.id).running
        other.stop(job.id, grace=0)


def test_the_trio_ssl_object_jobd_decrypts_from_is_there() -> None:
    """jobd's reader takes whole frames of decrypted records from trio's SSLStream's
    SSL object (jobd._session, issue 24); without it every record would take trio's
    slow way again, unnoticed but for the benchmark."""
    import ssl

    import trio
    import trio.testing

    stream = trio.SSLStream(trio.testing.MemorySendStream(), ssl.create_default_context())
    assert isinstance(getattr(stream, "_ssl_object", None), ssl.SSLObject)


def test_resizes_are_recorded_once_at_their_place_and_replayed(jobd: JobdProcess) -> None:
    """Each accepted resize is recorded in the job's log at its place and time
    (issue 24): a resize to the size already recorded makes no record, resizes
    with no output between them make one (the last size), so a client spamming
    resizes cannot grow the record; ``stream --asciicast`` replays it as an "r"
    event between the output before it and the output after it; a reader that
    did not ask for resizes never sees one, and positions stay good."""
    with connect(jobd) as client:
        job = client.start(["sh", "-c", "read a; echo one; read b; echo two"],
                           tty=p.Terminal(24, 80, "xterm"))
        with client.attach(job.id, 0, input=True) as session:
            session.resize(24, 80)  # its size already: nothing to record
            session.send(b"x\r")
            read_until(session, b"one")
            for i in range(2000):  # no output meanwhile: one record, the last size
                session.resize(30 + i % 7, 100)
            session.resize(40, 120)
            session.send(b"y\r")
            read_until(session, b"two")
            for _ in session:
                pass
        assert session.end is not None and session.end.status.exit_code == 0

        events = list(client.output(job.id, timestamps=True, resizes=True))
        sizes = [e for e in events if isinstance(e, p.Resized)]
        assert [(e.rows, e.cols) for e in sizes] == [(40, 120)]
        at = events.index(sizes[0])
        before = b"".join(e.data for e in events[:at] if isinstance(e, p.OutputChunk))
        after = b"".join(e.data for e in events[at:] if isinstance(e, p.OutputChunk))
        assert b"one" in before and b"two" not in before and b"two" in after
        # Resuming right after the resize gives what followed it, and nothing else.
        rest = [e for e in client.output(job.id, sizes[0].position, resizes=True)
                if isinstance(e, p.OutputChunk)]
        assert b"".join(e.data for e in rest) == after
        # Without asking: output only, the same bytes, the same last position.
        plain = list(client.output(job.id))
        assert not any(isinstance(e, p.Resized) for e in plain)
        assert b"".join(e.data for e in plain if isinstance(e, p.OutputChunk)) == before + after
        assert plain[-1] == events[-1]

    cast = jobd.jobctl("alice", "stream", "--asciicast", str(job.id))
    assert cast.returncode == 0, cast.stderr
    header, *lines = [json.loads(line) for line in cast.stdout.splitlines()]
    assert (header["height"], header["width"]) == (24, 80)
    kinds = [kind for _, kind, _ in lines]
    assert kinds.count("r") == 1
    r = kinds.index("r")
    assert lines[r][2] == "120x40"
    shown_before = "".join(text for _, kind, text in lines[:r] if kind == "o")
    shown_after = "".join(text for _, kind, text in lines[r:] if kind == "o")
    assert "one" in shown_before and "two" in shown_after and "two" not in shown_before
    times = [t for t, _, _ in lines]
    assert times == sorted(times)
