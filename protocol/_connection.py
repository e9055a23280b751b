"""Client and server connection objects: bytes in, messages out, no IO.

Usage, h11-style::

    conn = ClientConnection()
    sock.send(conn.send(Hello(software="me 1.0")))
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))  # b"" at EOF
            continue
        ...  # a message, or CLOSED

``receive_data()`` only buffers. ``next_event()`` returns the next message,
:data:`NEED_DATA` when the buffer holds no complete frame, or :data:`CLOSED`
once the peer closed at a frame boundary (EOF inside a frame is an error).
``send()`` checks that this side may send the message now and returns its
frame; the caller writes it.

The receive buffer is bounded the wsproto way: a frame's 4-byte length prefix
is checked against ``max_frame_size`` as soon as it has arrived, before any of
its payload is waited for, so the buffer never holds more than one frame's
worth (``max_frame_size + 4``) plus what the latest ``receive_data()`` added.
Call ``next_event()`` until NEED_DATA before feeding more data; feeding more
while over that bound is a LocalProtocolError.

Bulk receiving without a copy, the way asyncio's ``BufferedProtocol`` does
it: ``get_buffer(n)`` lends a writable view of the buffer's free space,
``sock.recv_into(view)`` fills it, ``buffer_updated(count)`` commits it. The
buffer is one bytearray with a start and an end: a consumed frame only moves
the start, and the unconsumed tail moves to the front only when the free space
runs out, so a stream of large frames costs no allocation per frame (resizing
a bytearray whose front was deleted reallocates and copies it). A client keeps
its buffer; a server drops it when it is empty, so idle connections cost
nothing. ``out`` frames in the exact layout :func:`encode_output_chunk`
writes, and ``input`` frames in the layout :func:`encode_input` writes, are
decoded without msgpack (anything else takes the general path).
:meth:`bytes_wanted` says how much the next frame still needs, for a driver
that can read exactly that much.

The peer's EOF (CLOSED) ends only what we receive: a server whose client
vanished mid-response may still call ``send()`` until it notices.

After a RemoteProtocolError the connection is in state ERROR and every call
raises an error of the same kind again. A LocalProtocolError from ``send()``
changes nothing (nothing was sent): a server whose answer is too large for a
frame can still send a smaller one or an error.
"""

from __future__ import annotations

import enum

from ._base import PROTOCOL_VERSION, _Message
from ._bounds import REQUEST_DECODE_LIMITS, DecodeLimits
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, clip
from ._frames import (
    _HEADER,
    _MAX_PREFIX,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    decode_payload,
    encode_frame,
    encode_input,
    encode_output_chunk,
    parse_input,
    parse_output_chunk,
)
from ._interactive import Input
from ._messages import Error, Hello, Message, OutputChunk, Tick, Welcome
from ._state import ATTACH_INPUT, TURN, ConnectionState, Conversation, IllegalMove, Role

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import ClassVar, Final, Literal, TypeAlias


class Sentinel(enum.Enum):
    """The type of NEED_DATA and CLOSED."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


#: next_event(): no complete frame yet; feed more bytes with receive_data().
NEED_DATA: Final = Sentinel.NEED_DATA
#: next_event(): the peer closed the connection cleanly, at a frame boundary.
CLOSED: Final = Sentinel.CLOSED

#: What next_event() returns.
if TYPE_CHECKING:
    Event: TypeAlias = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]
else:  # the same union, without typing's Literal
    Event = Message | Sentinel

_S = ConnectionState


class _Connection:
    """What both sides share: the receive buffer, the conversation, the error state."""

    our_role: ClassVar[Role]
    their_role: ClassVar[Role]
    #: Caps for decoding the peer's frames; None: derived from each frame's size.
    _decode_limits: ClassVar[DecodeLimits | None] = None
    #: Drop the receive buffer's memory whenever it is empty (servers: many idle
    #: connections) rather than keep it for the next frame (clients: few, busy).
    _release_when_empty: ClassVar[bool] = False

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if type(max_frame_size) is not int or not 0 < max_frame_size <= _MAX_PREFIX:
            raise ValueError(f"max_frame_size must be an integer in [1, 2**32), "
                             f"not {max_frame_size!r}")
        #: The largest frame payload we accept.
        self.max_frame_size = max_frame_size
        #: The largest frame payload we send (the client adopts the server's).
        self.send_limit = max_frame_size
        self._buf = bytearray()
        self._start = 0  # buffered bytes are _buf[_start:_end]
        self._end = 0
        self._eof = False
        self._closed = False
        self._conversation = Conversation()
        self._error: ProtocolError | None = None

    @property
    def state(self) -> ConnectionState:
        """ERROR after a protocol error, CLOSED after the peer's EOF, else the conversation's."""
        if self._error is not None:
            return _S.ERROR
        if self._closed:
            return _S.CLOSED
        return self._conversation.state

    @property
    def request(self) -> str | None:
        """The wire type of the request in progress (``"stream"``...), or None."""
        return self._conversation.request

    @property
    def _buffer(self) -> memoryview:
        """The buffered bytes not consumed yet (a view: for tests and debugging)."""
        return memoryview(self._buf)[self._start:self._end]

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed (EOF)."""
        self._fail_fast()
        size = len(data) if isinstance(data, bytes | bytearray) else memoryview(data).nbytes
        if self._eof:
            if size:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if not size:
            self._eof = True
            return
        self._check_bound("receive_data")
        self._reserve(size)
        self._buf[self._end:self._end + size] = data
        self._end += size

    def get_buffer(self, sizehint: int) -> memoryview:
        """A writable view of free buffer space, at least ``sizehint`` bytes, for
        ``recv_into``; then call :meth:`buffer_updated` with the count received.

        The same as ``receive_data(sock.recv(n))`` without the copy. The view is
        only good until the next call on this connection.
        """
        self._fail_fast()
        if self._eof:
            raise LocalProtocolError("get_buffer() called after EOF")
        self._check_bound("get_buffer")
        self._reserve(max(sizehint, 1))
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` written at the start of the view :meth:`get_buffer` gave.

        0 bytes is not EOF: pass ``b""`` to :meth:`receive_data` for that.
        """
        self._fail_fast()
        if type(nbytes) is not int or not 0 <= nbytes <= len(self._buf) - self._end:
            raise LocalProtocolError(f"buffer_updated({nbytes!r}): not within the buffer "
                                     "that get_buffer() gave")
        self._end += nbytes

    def bytes_wanted(self) -> int:
        """How many more bytes the next frame needs before :meth:`next_event` can
        return it: the rest of its length prefix, else the rest of its payload; 0
        when it is whole (or its prefix is refused: next_event() says why).

        A driver that can read exactly this much (a TLS object that has decrypted
        records waiting) never buffers more than one frame.
        """
        available = self._end - self._start
        if available < HEADER_SIZE:
            return HEADER_SIZE - available
        size: int = _HEADER.unpack_from(self._buf, self._start)[0]
        if size > self.max_frame_size or size == 0:
            return 0
        return max(0, HEADER_SIZE + size - available)

    def next_event(self) -> Event:
        """The next message from the peer, NEED_DATA, or CLOSED.

        Raises RemoteProtocolError when the peer misbehaved; the connection is
        then in state ERROR.
        """
        self._fail_fast()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            if self.our_role is Role.CLIENT or self._eof:
                exc.error_frame = b""  # nobody to tell: a client sends no errors
            elif not exc.error_frame:
                exc.error_frame = encode_frame(Error(exc.code, clip(exc.message)))
            # Keep what the error says, not the exception, and let the exception go
            # without its traceback and context: their frames hold the decoder's
            # locals (the error itself, so a reference cycle) and, through the
            # callers' frames, this connection with its receive buffer (up to a
            # whole frame) and whatever owns it. A cycle is freed only by the cyclic
            # GC, long after the connection closed.
            self._error = RemoteProtocolError(exc.code, exc.message,
                                              error_frame=exc.error_frame,
                                              message_type=exc.message_type)
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None
            raise

    def send(self, msg: Message) -> bytes:
        """The frame for *msg*; LocalProtocolError if this side may not send it now."""
        self._fail_fast()
        if not isinstance(msg, _Message):
            raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
        if msg.TYPE in ATTACH_INPUT and self._conversation.state is not _S.ATTACH:
            # Lingering input is allowed from a client that had not yet seen the
            # end; one that has (this side) knows the attach is over.
            raise LocalProtocolError(f"{msg.TYPE!r} outside an attach")
        try:
            new = self._conversation.next_state(self.our_role, msg.TYPE)
        except IllegalMove as exc:
            raise LocalProtocolError(str(exc)) from None
        if type(msg) is Input:  # bulk input: the fast path (the same bytes)
            frame = encode_input(msg.data, max_frame_size=self.send_limit)
        else:
            frame = encode_frame(msg, max_frame_size=self.send_limit)
        self._conversation.commit(msg.TYPE, new)
        return frame

    # -- internals --------------------------------------------------------------

    def _check_bound(self, what: str) -> None:
        if self._end - self._start > self.max_frame_size + HEADER_SIZE:
            raise LocalProtocolError(f"{what}() called again without draining next_event() first")

    def _reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes at the end of the buffer."""
        buf, start, end = self._buf, self._start, self._end
        if len(buf) - end >= size:
            return
        pending = end - start
        if pending + size <= len(buf):
            # Move the unconsumed tail (at most one frame) to the front.
            with memoryview(buf) as view:
                view[:pending] = view[start:end]
        else:
            new = bytearray(max(pending + size, 2 * len(buf)))
            new[:pending] = memoryview(buf)[start:end]
            self._buf = new
        self._start, self._end = 0, pending

    def _consume(self, size: int) -> None:
        self._start += size
        if self._start == self._end:
            self._start = self._end = 0
            if self._release_when_empty and self._buf:
                self._buf = bytearray()

    def _fail_fast(self) -> None:
        error = self._error
        if error is not None:
            if isinstance(error, RemoteProtocolError):
                raise RemoteProtocolError(error.code, error.message,
                                          error_frame=error.error_frame,
                                          message_type=error.message_type)
            raise type(error)(error.code, error.message)

    def _next_event(self) -> Event:
        if self._closed:
            return CLOSED
        if self.their_role not in TURN[self._conversation.state]:
            # Not the peer's turn: nothing may arrive but EOF.
            buffered = self._end > self._start
            if buffered and self.our_role is Role.SERVER:
                raise RemoteProtocolError(ErrorCode.BAD_REQUEST, self._out_of_turn())
            if not buffered:
                if self._eof:
                    self._closed = True
                    return CLOSED
                return NEED_DATA
            # A client reads whatever the server sends, to report it clearly.
        msg = self._read_frame()
        if msg is None:
            if self._eof:
                if self._end > self._start:
                    raise RemoteProtocolError(
                        ErrorCode.BAD_REQUEST, "connection closed in the middle of a frame"
                    )
                self._closed = True
                return CLOSED
            return NEED_DATA
        try:
            new = self._conversation.next_state(self.their_role, msg.TYPE)
        except IllegalMove as exc:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        self._check_received(msg)
        self._conversation.commit(msg.TYPE, new)
        return msg

    def _read_frame(self) -> Message | None:
        """Decode and consume the buffer's first frame, or None if it is incomplete."""
        start = self._start
        available = self._end - start
        if available < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(self._buf, start)
        if size > self.max_frame_size:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"frame of {size} bytes exceeds the frame limit of {self.max_frame_size}",
            )
        if size == 0:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "empty frame")
        if available < HEADER_SIZE + size:
            return None
        begin = start + HEADER_SIZE
        msg: Message
        with memoryview(self._buf) as view, view[begin:begin + size] as payload:
            parsed = parse_output_chunk(payload)
            if parsed is not None:
                fd, data, position = parsed
                msg = OutputChunk(fd, bytes(data), position)
                data.release()
            else:
                raw = parse_input(payload)
                if raw is not None:
                    msg = Input(bytes(raw))
                    raw.release()
                else:
                    msg = decode_payload(payload, self._decode_limits)
        self._consume(HEADER_SIZE + size)
        return msg

    def _out_of_turn(self) -> str:
        state = self._conversation.state
        if state is _S.WELCOME:
            return "request before the welcome"
        if state is _S.DONE:
            return "data after the connection was refused"
        return "request while another is in progress"

    def _check_received(self, msg: Message) -> None:
        """Side-specific checks of a legal message (versions)."""


class ClientConnection(_Connection):
    """The client's side. Send Hello first, then one request at a time.

    Attributes:
      welcome: the server's Welcome once received (identity, role, limits).
    """

    our_role = Role.CLIENT
    their_role = Role.SERVER

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        super().__init__(max_frame_size)
        self.welcome: Welcome | None = None

    def next_event(self) -> Event:
        """As for every connection, but ``tick`` frames are consumed here: they only
        show that the server is alive, which the bytes arriving already told."""
        while True:
            event = super().next_event()
            if not isinstance(event, Tick):
                return event

    def _check_received(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            if msg.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"the server speaks protocol version {msg.version}, "
                    f"this client speaks version {PROTOCOL_VERSION}",
                )
            self.welcome = msg
            self.send_limit = msg.max_frame_size


class ServerConnection(_Connection):
    """The server's side. Receive Hello, answer Welcome or Error, then serve requests.

    Attributes:
      hello: the client's Hello once received.
    """

    our_role = Role.SERVER
    their_role = Role.CLIENT
    _release_when_empty = True
    # Requests are small by construction (docs/protocol.md §9): refuse anything
    # larger from its header. Replies, decoded by the client, are capped by size only.
    _decode_limits = REQUEST_DECODE_LIMITS

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        super().__init__(max_frame_size)
        self.hello: Hello | None = None

    def send_output(self, fd: int, data: bytes | bytearray | memoryview, position: int) -> bytes:
        """An ``out`` frame for the response in progress: the streaming fast path.

        The same bytes as ``send(OutputChunk(fd, data, position))``, with the
        state checked once and no dataclass built.
        """
        self._fail_fast()
        if self._conversation.state is not _S.STREAM and self._conversation.state is not _S.ATTACH:
            raise LocalProtocolError(
                f"a server cannot send 'out' in state {self._conversation.state.name}: "
                "no stream, output or attach request is in progress"
            )
        return encode_output_chunk(fd, data, position, max_frame_size=self.send_limit)

    def _check_received(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"unsupported protocol version {msg.version}: "
                    f"this server speaks version {PROTOCOL_VERSION}",
                )
            self.hello = msg


__all__ = ["CLOSED", "NEED_DATA", "ClientConnection", "Event", "Sentinel", "ServerConnection"]
