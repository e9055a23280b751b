"""The protocol's fast paths give exactly what the general paths give.

* ``parse_output_chunk`` (the client's decoder of ``out`` frames, no msgpack)
  against ``decode_payload``, for every integer form msgpack allows and for
  layouts it must leave to the general decoder;
* ``get_buffer``/``buffer_updated`` (receiving without a copy) against
  ``receive_data``, including the bound on what may be buffered;
* ``encode_input``/``parse_input`` (bulk input, issue 24) against
  ``encode_frame``/``decode_payload``, and ``bytes_wanted`` (a driver reading
  exactly the rest of the next frame).
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    MAX_INPUT_CHUNK,
    NEED_DATA,
    Attach,
    ClientConnection,
    End,
    Input,
    LocalProtocolError,
    OutputChunk,
    RemoteProtocolError,
    ServerConnection,
    Stream,
    decode_payload,
    encode_frame,
    encode_input,
    encode_output_chunk,
    parse_input,
    parse_output_chunk,
)

from .test_protocol_connection import HELLO, welcomed
from .test_protocol_messages import STATUS, WELCOME

HEAD = {fd: b"\x84\xa4type\xa3out\xa2fd" + bytes([fd]) + b"\xa4data" for fd in (1, 2)}
BIN_FORMS = {"c4": (0xC4, ">B", 0xFF), "c5": (0xC5, ">H", 0xFFFF), "c6": (0xC6, ">I", 1 << 32)}
UINT_FORMS = {"fix": None, "cc": (0xCC, ">B", 0xFF), "cd": (0xCD, ">H", 0xFFFF),
              "ce": (0xCE, ">I", 0xFFFFFFFF), "cf": (0xCF, ">Q", (1 << 64) - 1)}


def payload(fd: int, data: bytes, position: int, bin_form: str = "", uint_form: str = "") -> bytes:
    """An ``out`` payload with chosen (possibly non-minimal) integer forms."""
    if bin_form:
        marker, fmt, _ = BIN_FORMS[bin_form]
        bin_head = bytes([marker]) + struct.pack(fmt, len(data))
    else:
        bin_head = msgpack.packb(data)[: -len(data) or None]
    if uint_form == "fix":
        tail = bytes([position])
    elif uint_form:
        marker, fmt, _ = UINT_FORMS[uint_form]  # type: ignore[misc]
        tail = bytes([marker]) + struct.pack(fmt, position)
    else:
        tail = msgpack.packb(position)
    return HEAD[fd] + bin_head + data + b"\xa8position" + tail


def parsed(raw: bytes) -> tuple[int, bytes, int] | None:
    result = parse_output_chunk(memoryview(raw))
    if result is None:
        return None
    fd, data, position = result
    return fd, bytes(data), position


@given(st.sampled_from([1, 2]), st.binary(max_size=300) | st.sampled_from(
    [b"x" * 255, b"y" * 256, b"z" * 65535, b"w" * 65536]),
    st.integers(0, (1 << 64) - 1) | st.sampled_from(
        [0, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32]))
def test_parse_reads_what_the_fast_encoder_writes(fd: int, data: bytes, position: int) -> None:
    frame = encode_output_chunk(fd, data, position)
    assert parsed(frame[4:]) == (fd, data, position)
    assert decode_payload(frame[4:]) == OutputChunk(fd, data, position)


@pytest.mark.parametrize("bin_form", sorted(BIN_FORMS))
@pytest.mark.parametrize("uint_form", sorted(UINT_FORMS))
def test_parse_accepts_every_integer_form_the_general_decoder_does(
        bin_form: str, uint_form: str) -> None:
    data = b"abc" * 30
    position = 5 if uint_form == "fix" else 77
    raw = payload(2, data, position, bin_form, uint_form)
    assert decode_payload(raw) == OutputChunk(2, data, position)
    assert parsed(raw) == (2, data, position)


@pytest.mark.parametrize("raw", [
    # the same map, other key orders or extra keys: valid, but for the general path
    msgpack.packb({"fd": 1, "type": "out", "data": b"x", "position": 1}),
    msgpack.packb({"type": "out", "fd": 1, "data": b"x", "position": 1, "extra": 0}),
    msgpack.packb({"type": "out", "fd": 1, "position": 1, "data": b"x"}),
    # invalid: wrong fd, trailing bytes, truncations, a str instead of bin, negatives
    payload(1, b"x", 1).replace(b"fd\x01", b"fd\x03"),
    payload(1, b"xy", 1) + b"\x00",
    payload(1, b"xy", 1)[:-1],
    payload(1, b"xy", 300)[:-1],
    payload(1, b"xy", 1)[:-10],
    HEAD[1] + b"\xa1x\xa8position\x01",
    HEAD[1] + b"\xc4\x01x\xa8position\xff",
    HEAD[1] + b"\xc4\x01x\xa8position\xd0\x01",
    HEAD[1] + b"\xc4\x05x\xa8position\x01",
    HEAD[1],
    b"",
])
def test_parse_leaves_everything_else_to_the_general_decoder(raw: bytes) -> None:
    assert parse_output_chunk(raw) is None


@given(st.binary(max_size=64))
def test_parse_never_disagrees_with_the_general_decoder(raw: bytes) -> None:
    body = payload(1, b"data!", 9)
    for candidate in (raw, body[: len(raw)] + raw, body + raw):
        result = parsed(candidate)
        if result is None:
            continue
        assert decode_payload(candidate) == OutputChunk(*result)


def test_parse_takes_any_buffer() -> None:
    raw = payload(1, b"hello", 3)
    for buf in (raw, bytearray(raw), memoryview(raw), memoryview(raw).cast("c")):
        result = parse_output_chunk(buf)
        assert result is not None and bytes(result[1]) == b"hello"


# -- receiving into the connection's buffer ------------------------------------


def streaming() -> tuple[ClientConnection, ServerConnection]:
    client, server = welcomed()
    server.receive_data(client.send(Stream(7)))
    assert server.next_event() == Stream(7)
    return client, server


def feed_into(conn: ClientConnection, data: bytes, piece: int) -> list[object]:
    events: list[object] = []
    for i in range(0, len(data), piece):
        chunk = data[i:i + piece]
        view = conn.get_buffer(len(chunk))
        assert len(view) >= len(chunk)
        view[:len(chunk)] = chunk
        conn.buffer_updated(len(chunk))
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


@pytest.mark.parametrize("piece", [1, 7, 16384, 1 << 20])
def test_get_buffer_gives_the_same_events_as_receive_data(piece: int) -> None:
    client, server = streaming()
    chunks = [OutputChunk(1 + i % 2, bytes([i]) * (i * 9973 % 300000), i + 1) for i in range(12)]
    wire = b"".join(server.send_output(c.fd, c.data, c.position) for c in chunks)
    end = End(STATUS, 12)
    wire += server.send(end)
    assert feed_into(client, wire, piece) == [*chunks, end]
    client.receive_data(b"")
    assert client.next_event() is CLOSED


def test_a_client_keeps_its_buffer_between_large_frames() -> None:
    client, server = streaming()
    data = b"x" * (512 * 1024)
    frame = server.send_output(1, data, 1)
    feed_into(client, frame, 16384)
    buffer = client._buf
    for i in range(2, 10):
        events = feed_into(client, server.send_output(1, data, i), 16384)
        assert events == [OutputChunk(1, data, i)]
    assert client._buf is buffer  # no allocation per frame


def test_a_server_drops_its_buffer_when_drained() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(HELLO))
    assert server.next_event() == HELLO
    assert len(server._buf) == 0 and len(server._buffer) == 0


def test_buffer_updated_must_stay_within_the_lent_buffer() -> None:
    client, _server = welcomed()
    view = client.get_buffer(10)
    for bad in (-1, len(view) + 1, 1.0):
        with pytest.raises(LocalProtocolError):
            client.buffer_updated(bad)  # type: ignore[arg-type]
    client.buffer_updated(0)  # nothing arrived: not EOF
    assert client.next_event() is NEED_DATA


def test_get_buffer_after_eof_is_a_local_error() -> None:
    client, _server = welcomed()
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.get_buffer(10)


def test_get_buffer_keeps_the_bound_on_what_is_buffered() -> None:
    small = ClientConnection(max_frame_size=2000)
    small.send(HELLO)
    small.receive_data(encode_frame(WELCOME))
    frame = encode_frame(OutputChunk(1, b"x" * 1000, 1))
    for _ in range(2):
        view = small.get_buffer(len(frame))
        view[:len(frame)] = frame
        small.buffer_updated(len(frame))
    with pytest.raises(LocalProtocolError, match="without draining"):
        small.get_buffer(len(frame))


def test_an_oversized_frame_is_refused_before_its_payload() -> None:
    client, _server = welcomed()
    view = client.get_buffer(4)
    view[:4] = (2 << 20).to_bytes(4, "big")
    client.buffer_updated(4)
    with pytest.raises(RemoteProtocolError, match="exceeds the frame limit"):
        client.next_event()


# -- input frames (issue 24) --------------------------------------------------

INPUT_HEAD = b"\x82\xa4type\xa5input\xa4data"


def input_payload(data: bytes, bin_form: str = "") -> bytes:
    if bin_form:
        marker, fmt, _ = BIN_FORMS[bin_form]
        return INPUT_HEAD + bytes([marker]) + struct.pack(fmt, len(data)) + data
    return msgpack.packb({"type": "input", "data": data})


@pytest.mark.parametrize("size", [1, 255, 256, 65535, 65536, MAX_INPUT_CHUNK])
def test_the_input_fast_path_writes_and_reads_what_the_general_path_does(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = encode_input(data)
    assert frame == encode_frame(Input(data))
    assert bytes(parse_input(frame[4:]) or b"") == data
    assert decode_payload(frame[4:]) == Input(data)


@pytest.mark.parametrize("bin_form", sorted(BIN_FORMS))
def test_parse_input_accepts_every_bin_form_the_general_decoder_does(bin_form: str) -> None:
    raw = input_payload(b"abc" * 30, bin_form)
    assert decode_payload(raw) == Input(b"abc" * 30)
    assert bytes(parse_input(raw) or b"") == b"abc" * 30


@pytest.mark.parametrize("raw", [
    # valid, but another layout: the general path
    msgpack.packb({"data": b"x", "type": "input"}),
    # invalid or refused: the general path says why
    input_payload(b""),
    input_payload(b"x" * (MAX_INPUT_CHUNK + 1)),
    input_payload(b"xy") + b"\x00",
    input_payload(b"xy")[:-1],
    INPUT_HEAD + b"\xa2xy",
    INPUT_HEAD + b"\xc6",
    INPUT_HEAD,
    b"",
])
def test_parse_input_leaves_everything_else_to_the_general_decoder(raw: bytes) -> None:
    assert parse_input(raw) is None


@given(st.binary(max_size=64))
def test_parse_input_never_disagrees_with_the_general_decoder(raw: bytes) -> None:
    body = input_payload(b"data!")
    for candidate in (raw, INPUT_HEAD + raw, body[: len(raw)] + raw, body + raw):
        result = parse_input(candidate)
        if result is not None:
            assert decode_payload(candidate) == Input(bytes(result))


@pytest.mark.parametrize("data", [b"", b"x" * (MAX_INPUT_CHUNK + 1)])
def test_encode_input_refuses_what_input_refuses(data: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="1 to"):
        encode_input(data)
    with pytest.raises(LocalProtocolError, match="exceeds the frame limit"):
        encode_input(b"x" * 100, max_frame_size=50)


def attaching() -> tuple[ClientConnection, ServerConnection]:
    client, server = welcomed()
    server.receive_data(client.send(Attach(7, input=True)))
    assert server.next_event() == Attach(7, input=True)
    return client, server


def test_bytes_wanted_reads_exactly_one_frame_at_a_time() -> None:
    """A driver that reads exactly what bytes_wanted() says (as jobd's reader does
    from OpenSSL) gets every frame whole and never buffers a byte beyond it."""
    client, server = attaching()
    sizes = [1, 3, 16384, 16385, MAX_INPUT_CHUNK, 70000, 2]
    wire = b"".join(client.send(Input(bytes([i]) * n)) for i, n in enumerate(sizes))
    events: list[object] = []
    at = 0
    while at < len(wire):
        wanted = server.bytes_wanted()
        assert wanted > 0
        piece = wire[at:at + min(wanted, 5000)]  # records shorter than the frame
        view = server.get_buffer(len(piece))
        view[:len(piece)] = piece
        server.buffer_updated(len(piece))
        at += len(piece)
        assert len(server._buffer) <= MAX_INPUT_CHUNK + 64  # never beyond one frame
        if server.bytes_wanted() == 0:
            events.append(server.next_event())
            assert server.next_event() is NEED_DATA
    assert events == [Input(bytes([i]) * n) for i, n in enumerate(sizes)]
    assert server.bytes_wanted() == 4  # the next length prefix


def test_bytes_wanted_is_zero_for_a_refused_length_prefix() -> None:
    _client, server = attaching()
    server.receive_data((2 << 20).to_bytes(4, "big"))
    assert server.bytes_wanted() == 0  # nothing more is read: next_event() says why
    with pytest.raises(RemoteProtocolError, match="exceeds the frame limit"):
        server.next_event()
    _client, server = attaching()
    server.receive_data(bytes(4))
    assert server.bytes_wanted() == 0
    with pytest.raises(RemoteProtocolError, match="empty frame"):
        server.next_event()
