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

The peer's EOF (CLOSED) ends only what we receive: a server whose client
vanished mid-response may still call ``send()`` until it notices.

After a RemoteProtocolError the connection is in state ERROR and every call
raises an error of the same kind again. A LocalProtocolError from ``send()``
changes nothing (nothing was sent): a server whose answer is too large for a
frame can still send a smaller one or an error.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final, Literal, TypeAlias

from ._base import PROTOCOL_VERSION, _Message
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, clip
from ._frames import (
    _HEADER,
    _MAX_PREFIX,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    decode_payload,
    encode_frame,
    encode_output_chunk,
)
from ._messages import Error, Hello, Message, Welcome
from ._state import TURN, ConnectionState, Conversation, IllegalMove, Role


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
Event: TypeAlias = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]

_S = ConnectionState


class _Connection:
    """What both sides share: the receive buffer, the conversation, the error state."""

    our_role: ClassVar[Role]
    their_role: ClassVar[Role]

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if type(max_frame_size) is not int or not 0 < max_frame_size <= _MAX_PREFIX:
            raise ValueError(f"max_frame_size must be an integer in [1, 2**32), "
                             f"not {max_frame_size!r}")
        #: The largest frame payload we accept.
        self.max_frame_size = max_frame_size
        #: The largest frame payload we send (the client adopts the server's).
        self.send_limit = max_frame_size
        self._buffer = bytearray()
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

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed (EOF)."""
        self._fail_fast()
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if not data:
            self._eof = True
            return
        if len(self._buffer) > self.max_frame_size + HEADER_SIZE:
            raise LocalProtocolError(
                "receive_data() called again without draining next_event() first"
            )
        self._buffer += data

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
            self._error = exc
            raise

    def send(self, msg: Message) -> bytes:
        """The frame for *msg*; LocalProtocolError if this side may not send it now."""
        self._fail_fast()
        if not isinstance(msg, _Message):
            raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
        try:
            new = self._conversation.next_state(self.our_role, msg.TYPE)
        except IllegalMove as exc:
            raise LocalProtocolError(str(exc)) from None
        frame = encode_frame(msg, max_frame_size=self.send_limit)
        self._conversation.commit(msg.TYPE, new)
        return frame

    # -- internals --------------------------------------------------------------

    def _fail_fast(self) -> None:
        error = self._error
        if error is not None:
            if isinstance(error, RemoteProtocolError):
                raise RemoteProtocolError(error.code, error.message,
                                          error_frame=error.error_frame)
            raise type(error)(error.code, error.message)

    def _next_event(self) -> Event:
        if self._closed:
            return CLOSED
        if TURN[self._conversation.state] is not self.their_role:
            # Not the peer's turn: nothing may arrive but EOF.
            if self._buffer and self.our_role is Role.SERVER:
                raise RemoteProtocolError(ErrorCode.BAD_REQUEST, self._out_of_turn())
            if not self._buffer:
                if self._eof:
                    self._closed = True
                    return CLOSED
                return NEED_DATA
            # A client reads whatever the server sends, to report it clearly.
        msg = self._read_frame()
        if msg is None:
            if self._eof:
                if self._buffer:
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
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(buffer)
        if size > self.max_frame_size:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"frame of {size} bytes exceeds the frame limit of {self.max_frame_size}",
            )
        if size == 0:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "empty frame")
        end = HEADER_SIZE + size
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view, view[HEADER_SIZE:end] as payload:
            msg = decode_payload(payload)
        del buffer[:end]
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

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        super().__init__(max_frame_size)
        self.hello: Hello | None = None

    def send_output(self, fd: int, data: bytes | bytearray | memoryview, position: int) -> bytes:
        """An ``out`` frame for the response in progress: the streaming fast path.

        The same bytes as ``send(OutputChunk(fd, data, position))``, with the
        state checked once and no dataclass built.
        """
        self._fail_fast()
        if self._conversation.state is not _S.STREAM:
            raise LocalProtocolError(
                f"a server cannot send 'out' in state {self._conversation.state.name}: "
                "no stream or output request is in progress"
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
