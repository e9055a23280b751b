"""Frames: strict, bounded decoding; encoding limits; the output-chunk fast path."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as p
from protocol import (
    MAX_DEPTH,
    ErrorCode,
    GetStatus,
    LocalProtocolError,
    OutputChunk,
    RemoteProtocolError,
    decode_payload,
    encode_frame,
    encode_output_chunk,
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def bad(payload: bytes, fragment: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(payload)
    exc = info.value
    assert exc.code is ErrorCode.BAD_REQUEST
    assert fragment in exc.message, exc.message
    # The error frame tells the peer the same thing.
    answer = decode_payload(exc.error_frame[4:])
    assert answer == p.Error(ErrorCode.BAD_REQUEST, exc.message)
    return exc


def nested(depth: int) -> bytes:
    """A hello frame whose extra field nests arrays so the whole map is *depth* deep."""
    return b"\x83\xa4type\xa5hello\xa7version\x01\xa1x" + b"\x91" * (depth - 1) + b"\xc0"


def test_nesting_up_to_max_depth_is_fine() -> None:
    assert decode_payload(nested(MAX_DEPTH)) == p.Hello(minor=0, software="")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 1000, 1100, 5000, 200_000])
def test_deep_nesting_is_rejected(depth: int) -> None:
    # Below 1024 levels msgpack's C unpacker builds the value and we refuse it;
    # beyond, it raises StackError itself. Neither crashes.
    bad(nested(depth), "nesting deeper than")


def test_deep_nesting_in_maps_is_rejected() -> None:
    payload = b"\x83\xa4type\xa5hello\xa7version\x01\xa1x" + b"\x81\xa1k" * 40 + b"\xc0"
    bad(payload, "nesting deeper than")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (pack([1, 2]), "must hold a map, not an array"),
        (pack("hello"), "must hold a map, not a string"),
        (pack(None), "must hold a map, not nil"),
        (pack({"type": "status", "job": 1}) + b"\xc0", "trailing bytes"),
        (b"\xc1", "invalid msgpack"),
        (b"\x82\xa4type", "truncated msgpack"),
        (pack({"type": "hello", "version": 1})[:-1], "truncated msgpack"),
        # bin 32 claiming 4 GiB inside a 30-byte frame: refused, never allocated
        (b"\x82\xa4type\xa5hello\xa1x\xc6\xff\xff\xff\xff" + b"x" * 10, "truncated"),
        (b"\x82\xa4type\xa5hello\xa1x\xdd\xff\xff\xff\xff", "truncated"),  # array 32
        (b"\x82\xa4type\xa5hello\xa1x\xdf\xff\xff\xff\xff", "truncated"),  # map 32
        (b"\x81\xa4type\xdb\xff\xff\xff\xff", "truncated"),  # str 32
        (b"\x82\xa4type\xa5hello\xa1x\xc7\x01\x05x", "extension type 5"),
        (b"\x82\xa4type\xa5hello\xa1x\xd6\xff\x00\x00\x00\x01", "extension type -1"),
        (b"\x82\xa4type\xa5hello\x01\x02", "map keys must be strings"),
        (b"\x82\xa4type\xa5hello\xc4\x01x\x02", "map keys must be strings"),
        (b"\x82\xa4type\xa5hello\xa1x\x81\x01\x02", "map keys must be strings"),
        (b"\x82\xa4type\xa5hello\xa1x\x91\x81\xc4\x01k\x02", "map keys must be strings"),
        (b"\x81\xa4type\xa2\xff\xfe", "not valid UTF-8"),
        (pack({"version": 1}), "string 'type'"),
        (pack({"type": b"hello", "version": 1}), "string 'type'"),
        (pack({"type": "teapot"}), "unknown message type 'teapot'"),
        (pack({"type": "status"}), "missing field 'job'"),
        (pack({"type": "status", "job": "7"}), "'job' must be an integer"),
        (pack({"type": "status", "job": True}), "'job' must be an integer"),
        (pack({"type": "status", "job": -7}), "job must not be negative"),
        (pack({"type": "start", "argv": ["ls"]}), "argv entries must be bytes"),
        (pack({"type": "start", "argv": []}), "argv must not be empty"),
        (pack({"type": "start", "argv": [b"a\0b"]}), "NUL"),
        (pack({"type": "start", "argv": [b"ls"], "env": [[b"A"]]}), "pairs"),
        (pack({"type": "start", "argv": [b"ls"], "env": {"A": b"1"}}), "must be an array"),
        (pack({"type": "start", "argv": [b"ls"], "limits": {"memory": -1}}), "positive"),
        (pack({"type": "start", "argv": [b"ls"], "limits": {"isolate": ["user"]}}), "user"),
        (pack({"type": "start", "argv": [b"ls"], "limits": {"io_read_bps": [1]}}), "pairs"),
        (pack({"type": "stop", "job": 1, "grace": "soon"}), "must be a number"),
        (pack({"type": "stop", "job": 1, "grace": -1.0}), "grace"),
        (pack({"type": "out", "fd": 3, "data": b"", "position": 0}), "fd must be 1"),
        (pack({"type": "out", "fd": 1, "data": "text", "position": 0}), "must be binary"),
        (pack({"type": "out", "fd": 1, "data": b""}), "missing field 'position'"),
        (pack({"type": "error", "code": "teapot", "message": "x"}), "unknown error code"),
        (pack({"type": "jobs", "jobs": [1], "more": False}), "must be maps"),
        (pack({"type": "jobs", "jobs": [{}], "more": False}), "missing field"),
        (pack({"type": "jobs", "jobs": [], "more": 0}), "must be a boolean"),
        (pack({"type": "end", "status": {"id": 1}, "position": 0}), "missing field"),
        (pack({"type": "started", "status": [1]}), "must be a map"),
        (pack({"type": "welcome", "version": 1}), "missing field 'minor'"),
        (pack({"type": "hello", "version": 2**64 - 1, "minor": -1}), "minor"),
    ],
)
def test_malformed_payloads(payload: bytes, fragment: str) -> None:
    bad(payload, fragment)


def test_error_messages_are_clipped() -> None:
    exc = bad(pack({"type": "x" * 100_000}), "unknown message type")
    assert len(exc.message) <= p.MAX_ERROR_MESSAGE
    assert len(exc.error_frame) < 1000


def test_decode_accepts_buffers() -> None:
    payload = encode_frame(GetStatus(3))[4:]
    assert decode_payload(bytearray(payload)) == GetStatus(3)
    assert decode_payload(memoryview(payload)) == GetStatus(3)


# -- encoding -----------------------------------------------------------------


def test_encode_too_large_is_local_error() -> None:
    msg = OutputChunk(1, b"x" * p.MAX_FRAME_SIZE, 0)
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(msg)
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    small = OutputChunk(1, b"x" * 100, 0)
    size = len(encode_frame(small)) - 4
    assert len(encode_frame(small, max_frame_size=size)) == size + 4
    with pytest.raises(LocalProtocolError):
        encode_frame(small, max_frame_size=size - 1)


def test_max_output_chunk_fits_a_frame() -> None:
    frame = encode_frame(OutputChunk(2, b"x" * p.MAX_OUTPUT_CHUNK, 2**64 - 1))
    assert len(frame) - 4 <= p.MAX_FRAME_SIZE


@pytest.mark.parametrize(
    "msg",
    [
        p.Error(ErrorCode.INTERNAL, "bad \udc80 surrogate"),
        p.StatusResult(p.JobStatus(id=2**64, owner="a", argv=(b"x",), state=p.JobState.RUNNING)),
        {"type": "status", "job": 1},
        None,
    ],
)
def test_unencodable_is_local_error(msg: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(msg)


# -- the output-chunk fast path -----------------------------------------------

SIZES = [0, 1, 255, 256, 65535, 65536, 64 * 1024, p.MAX_OUTPUT_CHUNK]
POSITIONS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("fd", [1, 2])
def test_fast_chunk_matches_encode_frame(size: int, position: int, fd: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    expected = encode_frame(OutputChunk(fd, data, position))
    assert encode_output_chunk(fd, data, position) == expected
    assert encode_output_chunk(fd, memoryview(data), position) == expected
    assert encode_output_chunk(fd, bytearray(data), position) == expected


@given(st.sampled_from([1, 2]), st.binary(max_size=2000), st.integers(0, 2**64 - 1))
@settings(max_examples=200)
def test_fast_chunk_matches_encode_frame_generated(fd: int, data: bytes, position: int) -> None:
    assert encode_output_chunk(fd, data, position) == encode_frame(OutputChunk(fd, data, position))


def test_fast_chunk_non_byte_memoryview() -> None:
    words = memoryview(struct.pack("<4I", 1, 2, 3, 4)).cast("I")
    assert encode_output_chunk(1, words, 0) == encode_frame(OutputChunk(1, words.tobytes(), 0))


@pytest.mark.parametrize(
    ("fd", "position"), [(0, 0), (3, 0), (True, 0), ("1", 0), (1, -1), (1, 2**64), (1, 1.0)]
)
def test_fast_chunk_rejects_invalid(fd: Any, position: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_output_chunk(fd, b"x", position)


def test_fast_chunk_respects_frame_limit() -> None:
    frame = encode_output_chunk(1, b"x" * 1000, 5)
    size = len(frame) - 4
    assert encode_output_chunk(1, b"x" * 1000, 5, max_frame_size=size) == frame
    with pytest.raises(LocalProtocolError) as info:
        encode_output_chunk(1, b"x" * 1000, 5, max_frame_size=size - 1)
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(LocalProtocolError):
        encode_output_chunk(1, b"x" * (p.MAX_FRAME_SIZE + 1), 0)


# -- structured fuzzing of decode_payload -------------------------------------

FIELD_NAMES = ["type", "version", "minor", "software", "argv", "cwd", "env", "limits", "job",
               "grace", "after", "position", "identity", "role", "max_frame_size", "status",
               "jobs", "more", "fd", "data", "code", "message", "id", "owner", "state",
               "created", "memory", "cpus", "isolate", "io_read_bps"]
# Cheap to draw on purpose: sampled keys and short leaves, shallow nesting. The
# earlier recursive strategy with free-text keys failed Hypothesis' "input
# generation is slow" health check on a loaded 2-core machine.
leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.sampled_from(["", "a", "\x00", "é"]) | st.sampled_from([b"", b"x", b"\x00"])
          | st.sampled_from(sorted(p.MESSAGE_TYPES))
          | st.sampled_from([c.value for c in ErrorCode]))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    max_leaves=6,
)
frames = st.builds(
    lambda kind, rest: {"type": kind, **rest},
    st.sampled_from(sorted(p.MESSAGE_TYPES)),
    st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=6),
)


@given(frames)
@settings(max_examples=400)
def test_structured_garbage_only_raises_remote_errors(frame: dict[str, Any]) -> None:
    try:
        msg = decode_payload(pack(frame))
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert exc.error_frame
    else:
        assert frame["type"] == msg.TYPE
