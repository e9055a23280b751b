"""Protocol minor 2: the attach conversation, both ways at once, and its bounds."""

from __future__ import annotations

import pytest

import protocol as p

from .conftest import ROOT


def _pair() -> tuple[p.ClientConnection, p.ServerConnection]:
    client, server = p.ClientConnection(), p.ServerConnection()
    _deliver(client, server, p.Hello())
    _deliver(server, client, p.Welcome(1, 2, "jobd", "alice", "control", p.MAX_FRAME_SIZE))
    return client, server


def _deliver(src: p.ClientConnection | p.ServerConnection,
             dst: p.ClientConnection | p.ServerConnection, msg: p.Message) -> p.Message:
    dst.receive_data(src.send(msg))
    event = dst.next_event()
    assert event == msg
    return msg


STATUS = p.JobStatus(7, "alice", (b"bash",), p.JobState.RUNNING, stdin=True,
                     tty=p.Terminal(24, 80, "xterm"))


def test_input_flows_while_output_does() -> None:
    client, server = _pair()
    _deliver(client, server, p.Attach(7, input=True))
    assert client.state is server.state is p.ConnectionState.ATTACH
    _deliver(client, server, p.Input(b"echo hi\r"))
    _deliver(server, client, p.OutputChunk(1, b"hi\r\n", 40))
    _deliver(client, server, p.Resize(40, 100))
    _deliver(client, server, p.InputEof())
    # The server's fast path for output is allowed during an attach too.
    client.receive_data(server.send_output(1, b"$ ", 60))
    assert client.next_event() == p.OutputChunk(1, b"$ ", 60)
    _deliver(client, server, p.Detach())
    _deliver(server, client, p.End(STATUS, 60))
    assert client.state is server.state is p.ConnectionState.IDLE


def test_input_sent_before_the_end_was_seen_is_accepted_then_a_request_follows() -> None:
    client, server = _pair()
    _deliver(client, server, p.Attach(7, input=True))
    late = client.send(p.Input(b"x")) + client.send(p.Detach())  # in flight...
    end = server.send(p.End(STATUS, 0))  # ...while the job ends
    server.receive_data(late)
    assert server.next_event() == p.Input(b"x")
    assert server.next_event() == p.Detach()
    client.receive_data(end)
    assert isinstance(client.next_event(), p.End)
    # The client knows the attach is over: it cannot send input any more.
    with pytest.raises(p.LocalProtocolError, match="outside an attach"):
        client.send(p.Input(b"y"))
    _deliver(client, server, p.GetStatus(7))
    # Once a new request came, late input is a protocol error again.
    _deliver(server, client, p.StatusResult(STATUS))
    server.receive_data(p.encode_frame(p.Input(b"z")))
    with pytest.raises(p.RemoteProtocolError, match="outside an attach"):
        server.next_event()


def test_input_outside_an_attach_is_refused() -> None:
    _client, server = _pair()
    server.receive_data(p.encode_frame(p.Resize(10, 10)))
    with pytest.raises(p.RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is p.ErrorCode.BAD_REQUEST


def test_a_request_during_an_attach_is_refused() -> None:
    client, server = _pair()
    _deliver(client, server, p.Attach(7))
    server.receive_data(p.encode_frame(p.GetStatus(7)))
    with pytest.raises(p.RemoteProtocolError, match="another is in progress"):
        server.next_event()


@pytest.mark.parametrize(("wire", "fragment"), [
    ({"type": "input", "data": b""}, "1 to 262144 bytes"),
    ({"type": "input", "data": "text"}, "data"),
    ({"type": "resize", "rows": 0, "cols": 80}, "rows must be from 1 to 65535"),
    ({"type": "resize", "rows": 24, "cols": 65536}, "cols must be from 1 to 65535"),
    ({"type": "attach", "job": -1}, "job"),
    ({"type": "start", "argv": [b"sh"], "tty": {"rows": 24, "cols": 80, "term": "x\ny"}},
     "term may hold only"),
    ({"type": "start", "argv": [b"sh"], "tty": {"rows": 24, "cols": 80, "term": "x" * 65}},
     "at most 64"),
    ({"type": "start", "argv": [b"sh"], "stdin": 1}, "stdin"),
])
def test_bad_interactive_fields_are_bad_requests(wire: dict[str, object], fragment: str) -> None:
    import msgpack

    with pytest.raises(p.RemoteProtocolError) as info:
        p.decode_payload(msgpack.packb(wire), p.REQUEST_DECODE_LIMITS)
    assert info.value.code is p.ErrorCode.BAD_REQUEST
    assert fragment in info.value.message


def test_the_largest_input_frame_fits_and_one_byte_more_is_refused() -> None:
    import msgpack

    frame = p.encode_frame(p.Input(b"\xff" * p.MAX_INPUT_CHUNK))
    assert len(frame) < p.MAX_FRAME_SIZE
    assert p.decode_payload(frame[4:], p.REQUEST_DECODE_LIMITS) == p.Input(
        b"\xff" * p.MAX_INPUT_CHUNK)
    with pytest.raises(p.RemoteProtocolError):
        p.decode_payload(msgpack.packb({"type": "input", "data": b"x" * (p.MAX_INPUT_CHUNK + 1)}),
                         p.REQUEST_DECODE_LIMITS)


def test_the_worked_examples_hex_dumps_are_real_frames_of_this_version() -> None:
    """docs/protocol.md §11: every hex dump decodes, hello and welcome carry the
    current minor (independent clients once found 0 where the maps said 1)."""
    import re

    doc = (ROOT / "docs" / "protocol.md").read_text()
    section = doc.split("## 11. Worked example", 1)[1].split("## 12.", 1)[0]
    frames: list[bytes] = []
    current = bytearray()
    for line in section.splitlines():
        if re.fullmatch(r"\s*(?:[0-9a-f]{2} )*[0-9a-f]{2}\s*", line):
            current += bytes.fromhex(line)
        elif current:
            frames.append(bytes(current))
            current = bytearray()
    assert len(frames) >= 5
    seen = set()
    for frame in frames:
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        message = p.decode_payload(frame[4:])
        assert p.encode_frame(message) == frame
        seen.add(message.TYPE)
        if isinstance(message, p.Hello | p.Welcome):
            assert message.minor == p.PROTOCOL_MINOR
    assert {"hello", "welcome", "out", "attach", "input"} <= seen
