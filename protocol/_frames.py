"""Frames: a 4-byte big-endian length, then one msgpack map.

This module turns one message into one frame (:func:`encode_frame`, and the
hand-built fast path :func:`encode_output_chunk`) and one payload back into a
message (:func:`decode_payload`). Splitting a byte stream into frames, and
checking each length prefix before buffering its payload, is the
connection's job (``_connection.py``).

Decoding is strict and bounded. ``msgpack.unpackb`` gets limits derived from
the payload's length (a bin header claiming 4 GiB inside a 20-byte frame is
rejected as truncated, never allocated); its C unpacker refuses more than
1024 levels of nesting with ``StackError``, and we refuse more than
:data:`MAX_DEPTH` ourselves. Extension types, map keys that are not strings,
trailing bytes after the map, a top level that is not a map, an unknown
``type``, and missing or mistyped fields are all ``bad_request``.
"""

from __future__ import annotations

import re
import struct

import msgpack

from ._base import _Message
from ._bounds import MAX_INPUT_BYTES, DecodeLimits
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError, clip
from ._fields import FieldError
from ._messages import MESSAGE_TYPES, Error, Message
from ._status import JobStatus

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any

#: Default maximum frame payload, in bytes. Big enough for a 512 KiB output
#: chunk with room to spare, and for a page of job statuses; small enough that
#: a thousand connections each holding one frame being received cost at most
#: about a gigabyte, and that a hostile peer cannot make us buffer much.
MAX_FRAME_SIZE = 1 << 20
#: The largest ``data`` a server puts in one ``out`` frame: half a frame, so a
#: chunk always fits whatever the other fields hold, yet large enough that the
#: per-frame overhead (about 30 bytes) is negligible for bulk output.
MAX_OUTPUT_CHUNK = 512 * 1024
#: Deepest nesting of arrays and maps accepted in a frame. The deepest real
#: frame is 6 levels (frame > jobs > status > limits > io_read_bps > pair);
#: 16 leaves room for future optional fields while keeping hostile input
#: shallow (msgpack's own C unpacker stops at 1024).
MAX_DEPTH = 16
#: Size of the length prefix.
HEADER_SIZE = 4

_HEADER = struct.Struct(">I")
#: The largest payload a 4-byte length prefix can express.
_MAX_PREFIX = (1 << 32) - 1


class _ExtensionType(ValueError):
    pass


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtensionType(f"msgpack extension type {code} is not allowed")


def encode_frame(msg: Message, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """The frame (length prefix + msgpack map) carrying *msg*.

    Raises LocalProtocolError if *msg* is not a message, cannot be encoded
    (an integer beyond 64 bits, a string with lone surrogates), or its payload
    would exceed *max_frame_size*.
    """
    if not isinstance(msg, _Message):
        raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
    try:
        payload: bytes = msgpack.packb(msg.to_wire(), use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {msg.TYPE!r}: {exc}") from exc
    size = len(payload)
    if size > min(max_frame_size, _MAX_PREFIX):
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"{msg.TYPE!r} frame of {size} bytes exceeds the frame limit of {max_frame_size}",
        )
    return _HEADER.pack(size) + payload


def encoded_size(value: JobStatus) -> int:
    """Bytes *value* takes inside a frame (its msgpack map): for sizing pages."""
    packed: bytes = msgpack.packb(value.to_wire(), use_bin_type=True)
    return len(packed)


# The fixed start of an "out" frame's map, as msgpack.packb writes it for
# {"type": "out", "fd": fd, "data": ..., "position": ...}: fixmap of 4 entries,
# then "type": "out", "fd": fd, and the key "data".
_CHUNK_HEADS = {
    fd: b"\x84\xa4type\xa3out\xa2fd" + bytes([fd]) + b"\xa4data" for fd in (1, 2)
}
_POSITION_KEY = b"\xa8position"
_U8 = struct.Struct(">BB")
_U16 = struct.Struct(">BH")
_U32 = struct.Struct(">BI")
_U64 = struct.Struct(">BQ")


def _bin_head(size: int) -> bytes:
    """msgpack's header of a bin of *size* bytes (bin 8, 16 or 32)."""
    if size < 0x100:
        return _U8.pack(0xC4, size)
    if size < 0x10000:
        return _U16.pack(0xC5, size)
    return _U32.pack(0xC6, size)


def _uint_size(value: int) -> int:
    """Bytes msgpack uses for a non-negative integer (it picks the smallest form)."""
    if value < 0x80:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    return 5 if value < 1 << 32 else 9


def encode_output_chunk(
    fd: int, data: bytes | bytearray | memoryview, position: int, *,
    max_frame_size: int = MAX_FRAME_SIZE,
) -> bytes:
    """The same bytes as ``encode_frame(OutputChunk(fd, data, position))``, faster.

    The server's hot loop: no dataclass, no generic packer, one copy of
    *data*. Only the checks that keep the frame valid are made (fd 1 or 2,
    position a uint64, the frame within *max_frame_size*): LocalProtocolError
    otherwise. The frame of the last ``bytes`` *data* is kept: many followers of
    one job send the very same chunk object, and encode it once.
    """
    global _last_frame
    head = _CHUNK_HEADS.get(fd) if type(fd) is int else None
    if head is None:
        raise LocalProtocolError(f"fd must be 1 (stdout) or 2 (stderr), not {fd!r}")
    if type(position) is not int or not 0 <= position < 1 << 64:
        raise LocalProtocolError(f"position must be an integer in [0, 2**64), not {position!r}")
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    bin_head = _bin_head(size)
    length = len(head) + len(bin_head) + size + len(_POSITION_KEY) + _uint_size(position)
    if length > min(max_frame_size, _MAX_PREFIX):
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"'out' frame of {length} bytes exceeds the frame limit of {max_frame_size}",
        )
    if position < 0x80:
        tail = _POSITION_KEY + bytes((position,))
    elif position < 0x100:
        tail = _POSITION_KEY + _U8.pack(0xCC, position)
    elif position < 0x10000:
        tail = _POSITION_KEY + _U16.pack(0xCD, position)
    elif position < 1 << 32:
        tail = _POSITION_KEY + _U32.pack(0xCE, position)
    else:
        tail = _POSITION_KEY + _U64.pack(0xCF, position)
    last = _last_frame
    if last is not None and last[1] is data and last[0] == fd and last[2] == position:
        return last[3]
    frame = b"".join((_HEADER.pack(length), head, bin_head, data, tail))
    if type(data) is bytes:  # immutable: the same object is the same bytes
        _last_frame = (fd, data, position, frame)
    return frame


#: (fd, data, position, frame) of the last "out" frame encoded from ``bytes``: one
#: chunk's worth of memory (at most one frame) held for the fan-out.
_last_frame: tuple[int, bytes, int, bytes] | None = None


_CHUNK_HEAD_SIZE = len(_CHUNK_HEADS[1])  # up to and including the key "data"
_FD_AT = _CHUNK_HEAD_SIZE - 6  # the fd's byte: before b"\xa4data"
_BIN_SIZES = {0xC4: _U8, 0xC5: _U16, 0xC6: _U32}
_UINT_SIZES = {0xCC: _U8, 0xCD: _U16, 0xCE: _U32, 0xCF: _U64}


def parse_output_chunk(
    payload: bytes | bytearray | memoryview,
) -> tuple[int, memoryview, int] | None:
    """(fd, data, position) of an ``out`` payload laid out as
    :func:`encode_output_chunk` writes it, with ``data`` a view into
    *payload*; None for any other payload (decode it with :func:`decode_payload`).

    The inverse of the fast path, for the client's hot loop: no msgpack, no
    copy. It accepts exactly what ``decode_payload`` decodes to the same
    ``OutputChunk`` (every integer form msgpack allows for the lengths and the
    position), so the two never disagree.
    """
    if not isinstance(payload, memoryview) or payload.format != "B":
        payload = memoryview(payload).cast("B")
    size = payload.nbytes
    if size < _CHUNK_HEAD_SIZE + 2 + len(_POSITION_KEY) + 1:
        return None
    fd = payload[_FD_AT]
    if fd not in (1, 2):
        return None
    if payload[:_CHUNK_HEAD_SIZE] != _CHUNK_HEADS[fd]:
        return None
    at = _CHUNK_HEAD_SIZE
    form = _BIN_SIZES.get(payload[at])
    if form is None or at + form.size > size:
        return None
    _, length = form.unpack_from(payload, at)
    start = at + form.size
    stop = start + length
    at = stop + len(_POSITION_KEY)
    if at >= size or payload[stop:at] != _POSITION_KEY:
        return None
    marker = payload[at]
    if marker < 0x80:
        position, at = marker, at + 1
    else:
        form = _UINT_SIZES.get(marker)
        if form is None or at + form.size > size:
            return None
        _, position = form.unpack_from(payload, at)
        at += form.size
    if at != size:
        return None
    return fd, payload[start:stop], position


# The fixed start of an "input" frame's map, as msgpack.packb writes it for
# {"type": "input", "data": ...}: fixmap of 2 entries, "type": "input", the key "data".
_INPUT_HEAD = b"\x82\xa4type\xa5input\xa4data"


def encode_input(data: bytes | bytearray | memoryview, *,
                 max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """The same bytes as ``encode_frame(Input(data))``, faster: the client's bulk
    input loop (no dataclass, no generic packer, one copy of *data*).

    LocalProtocolError unless *data* is 1 to ``MAX_INPUT_CHUNK`` bytes and the frame
    fits *max_frame_size*.
    """
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    if not 0 < size <= MAX_INPUT_BYTES:
        raise LocalProtocolError(f"input data must be 1 to {MAX_INPUT_BYTES} bytes, not {size}")
    bin_head = _bin_head(size)
    length = len(_INPUT_HEAD) + len(bin_head) + size
    if length > min(max_frame_size, _MAX_PREFIX):
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"'input' frame of {length} bytes exceeds the frame limit of {max_frame_size}",
        )
    return b"".join((_HEADER.pack(length), _INPUT_HEAD, bin_head, data))


def parse_input(payload: bytes | bytearray | memoryview) -> memoryview | None:
    """The data of an ``input`` payload laid out as :func:`encode_input` (and
    msgpack) writes it, as a view into *payload*; None for any other payload,
    including an ``input`` whose data is empty or over ``MAX_INPUT_CHUNK`` (decode
    it with :func:`decode_payload`, which says what is wrong).

    The server's hot loop for bulk input: no msgpack. It accepts exactly what
    ``decode_payload`` decodes to the same ``Input`` (every bin form msgpack allows
    for the length), so the two never disagree.
    """
    if not isinstance(payload, memoryview) or payload.format != "B":
        payload = memoryview(payload).cast("B")
    size = payload.nbytes
    at = len(_INPUT_HEAD)
    if size < at + 3 or payload[:at] != _INPUT_HEAD:
        return None
    form = _BIN_SIZES.get(payload[at])
    if form is None or at + form.size > size:
        return None
    _, length = form.unpack_from(payload, at)
    start = at + form.size
    if start + length != size or not 0 < length <= MAX_INPUT_BYTES:
        return None
    return payload[start:]


def bad_request(message: str) -> RemoteProtocolError:
    """A RemoteProtocolError(bad_request) whose error_frame tells the peer why."""
    message = clip(message)
    frame = encode_frame(Error(ErrorCode.BAD_REQUEST, message))
    return RemoteProtocolError(ErrorCode.BAD_REQUEST, message, error_frame=frame)


def decode_payload(payload: bytes | bytearray | memoryview,
                   limits: DecodeLimits | None = None) -> Message:
    """The message in one frame's payload (the bytes after the length prefix).

    *limits* caps the lengths and the number of containers (a server decoding
    requests passes :data:`REQUEST_DECODE_LIMITS`); None (replies, decoded by a
    client) caps every length at the payload's size, so that no length field
    can claim more than the frame holds.

    Raises RemoteProtocolError(bad_request), with ``error_frame`` set, on
    anything wrong: invalid or truncated msgpack, trailing bytes, a top level
    that is not a map, extension types, nesting deeper than
    :data:`MAX_DEPTH`, a length or container count beyond *limits*,
    non-string map keys, an unknown ``type``, a missing or mistyped field, or a
    value the message refuses. The error's ``message_type`` names the message
    when its type was read.
    """
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    # unpackb has no max_buffer_size (the whole input is the buffer).
    options: dict[str, Any] = dict(
        max_str_len=size, max_bin_len=size, max_array_len=size, max_map_len=size,
        max_ext_len=size)
    if limits is not None:
        # A length over the limit is refused from its header, before anything is
        # allocated; the hooks count containers as they complete (C calls them).
        options.update(
            max_str_len=min(size, limits.max_str_len), max_bin_len=min(size, limits.max_bin_len),
            max_array_len=min(size, limits.max_array_len),
            max_map_len=min(size, limits.max_map_len))
        budget = _ItemBudget(limits.max_items)
        options.update(list_hook=budget.count, object_hook=budget.count)
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                              ext_hook=_reject_ext, **options)
    except Exception as exc:  # msgpack raises several kinds; no input may escape as those
        error = bad_request(_describe(exc, size))
        error.message_type = _peek_type(payload, size, options)
        raise error from None
    if type(obj) is not dict:
        raise bad_request(f"a frame must hold a map, not {_kind(obj)}")
    _check_structure(obj)
    kind = obj.get("type")
    if type(kind) is not str:
        raise bad_request("a frame's map must have a string 'type'")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise bad_request(f"unknown message type {kind!r}")
    try:
        return cls.from_wire(obj)
    except (FieldError, ValueError, TypeError) as exc:
        error = bad_request(f"bad {kind!r} message: {exc}")
        error.message_type = kind
        raise error from None


#: How many entries of a refused frame's map _peek_type looks through.
_PEEK_ENTRIES = 64


def _peek_type(payload: bytes | bytearray | memoryview, size: int,
               options: dict[str, Any]) -> str | None:
    """The ``type`` of a frame that failed to decode, if it can be read cheaply: for
    the log (a start refused for its size is still a refused start). Values before
    the ``type`` key are skipped, which msgpack does in C without building them."""
    try:
        unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=True, ext_hook=_reject_ext, max_buffer_size=size,
            **{k: v for k, v in options.items() if k.startswith("max_")})
        unpacker.feed(payload)
        for _ in range(min(unpacker.read_map_header(), _PEEK_ENTRIES)):
            if unpacker.unpack() == "type":
                kind = unpacker.unpack()
                return kind if type(kind) is str and kind in MESSAGE_TYPES else None
            unpacker.skip()
    except Exception:  # anything wrong: the type is unknown, as it was
        return None
    return None


class _TooManyItems(ValueError):
    pass


class _ItemBudget:
    """Counts the arrays, maps and elements of one frame as msgpack completes them."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def count(self, container: Any) -> Any:
        self.left -= 1 + len(container)
        if self.left < 0:
            raise _TooManyItems(f"more than {self.limit} arrays, maps and elements "
                                "in one request")
        return container


def _check_structure(top: dict[Any, Any]) -> None:
    """Reject non-string keys, nesting deeper than MAX_DEPTH, and timestamps.

    Walks level by level without recursion. The C unpacker decodes the
    timestamp extension (-1) itself without calling ext_hook, so it is caught
    here. Each container's element types are collected in C (``set(map(type,
    ...))``); only containers holding containers are walked in Python, so a
    frame of a million scalars costs a few milliseconds, not a Python loop.
    """
    level: list[Any] = [top]
    depth = 1
    while level:
        if depth > MAX_DEPTH:
            raise bad_request(f"nesting deeper than {MAX_DEPTH} levels")
        below: list[Any] = []
        for node in level:
            if type(node) is dict:
                if not _STR_ONLY.issuperset(map(type, node)):
                    raise bad_request("map keys must be strings")
                values: Any = node.values()
            else:
                values = node
            kinds = set(map(type, values))
            if msgpack.Timestamp in kinds:
                raise bad_request("msgpack extension type -1 is not allowed")
            if dict in kinds or list in kinds:
                below.extend(v for v in values if type(v) is dict or type(v) is list)
        level = below
        depth += 1


_STR_ONLY = frozenset({str})


_OVER_LIMIT = re.compile(r"^(\d+) exceeds max_(str|bin|array|map)_len\((\d+)\)$")
_WHAT = {"str": "a string of {} bytes", "bin": "binary of {} bytes",
         "array": "an array of {} elements", "map": "a map of {} entries"}


def _describe(exc: Exception, size: int) -> str:
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the frame's map"
    if isinstance(exc, msgpack.StackError | RecursionError):
        return f"nesting deeper than {MAX_DEPTH} levels"
    if isinstance(exc, _ExtensionType | _TooManyItems):
        return str(exc)
    over = _OVER_LIMIT.match(str(exc))
    if over is not None and int(over[1]) <= size:  # fits the frame, but not the limit
        what = _WHAT[over[2]].format(over[1])
        return f"{what} exceeds the request limit of {over[3]}"
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, msgpack.FormatError):
        return "invalid msgpack"
    text = str(exc)
    if "incomplete input" in text or "exceeds max_" in text:
        return "truncated msgpack: a length exceeds what the frame holds"
    if "map key" in text:
        return "map keys must be strings"
    return f"invalid msgpack: {text or type(exc).__name__}"


def _kind(obj: object) -> str:
    return {list: "an array", str: "a string", bytes: "binary", bool: "a boolean",
            int: "an integer", float: "a float", type(None): "nil"}.get(type(obj), "a value")


__all__ = [
    "HEADER_SIZE",
    "MAX_DEPTH",
    "MAX_FRAME_SIZE",
    "MAX_OUTPUT_CHUNK",
    "bad_request",
    "decode_payload",
    "encode_frame",
    "encode_input",
    "encode_output_chunk",
    "encoded_size",
    "parse_input",
    "parse_output_chunk",
]
