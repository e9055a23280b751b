"""Error codes and the protocol's two exception kinds.

Following h11, there are two ways a protocol conversation can go wrong:

- :class:`LocalProtocolError`: *we* misused the API: we tried to send a
  message this side may not send, or not in this state, or one too large for
  a frame. Nothing was sent; it is a bug in the calling code.
- :class:`RemoteProtocolError`: *the peer* misbehaved: a malformed, oversized
  or truncated frame, or a message out of order. The connection cannot go on.
  On the server side ``error_frame`` holds an encoded ``error`` frame that
  tells the client why, to be sent before closing.

Both carry a stable :class:`ErrorCode` and a human message; ``str(exc)`` is the
message.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The stable error codes of an ``error`` frame (docs/protocol.md lists when each is used)."""

    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    BAD_REQUEST = "bad_request"
    INVALID_STATE = "invalid_state"
    UNSUPPORTED_VERSION = "unsupported_version"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


#: Peer-controlled text (a field name, a bad value) can end up in an error
#: message; the message is cut to this many characters so that the error frame
#: stays small whatever the peer sent.
MAX_ERROR_MESSAGE = 512


def clip(message: str) -> str:
    """*message* cut to :data:`MAX_ERROR_MESSAGE` characters."""
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 3] + "..."


class ProtocolError(Exception):
    """Base class of the protocol's errors.

    Attributes:
      code: an :class:`ErrorCode`.
      message: a human-readable explanation; also ``str(exc)``.

    ``ProtocolError(code, message)``; ``ProtocolError(message)`` alone means
    ``bad_request``.
    """

    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode | str, message: str | None = None) -> None:
        if message is None:
            code, message = ErrorCode.BAD_REQUEST, str(code)
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """We misused the protocol: an illegal send, a wrong-side message, a frame too large."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved; the connection must be closed.

    Attributes:
      code, message: as :class:`ProtocolError`.
      error_frame: an encoded ``error`` frame to send to the peer before
        closing; ``b""`` when there is nothing to say (always on the client
        side: a client does not send errors to the server).
      message_type: the wire type of the message refused (``"start"``) when the
        frame decoded far enough to tell, else None (for the server's log).
    """

    error_frame: bytes
    message_type: str | None

    def __init__(
        self, code: ErrorCode | str, message: str | None = None, *, error_frame: bytes = b"",
        message_type: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.error_frame = error_frame
        self.message_type = message_type


__all__ = [
    "MAX_ERROR_MESSAGE",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "clip",
]
