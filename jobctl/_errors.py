"""The errors a jobctl user (or a script embedding the library) can see.

Each carries the exit status the CLI uses for it (SPEC §2):
1 the server refused or the job is in the wrong state, 2 usage or local
configuration, 3 cannot connect or refused at TLS or identity level; and
124 a wait that timed out (SPEC §9, as timeout(1)).

Every error the library raises is a :class:`JobctlError`: a bad argument is an
:class:`InvalidArgument` (also a ``ValueError``), never the protocol's own
``FieldError``.
"""

from __future__ import annotations

from protocol import ErrorCode


class JobctlError(Exception):
    """Base class. ``str(exc)`` is the one-line message for the user."""

    exit_status = 1


class ServerError(JobctlError):
    """The server answered a request with an error frame."""

    exit_status = 1

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(ServerError):
    pass


class PermissionDenied(ServerError):
    pass


class InvalidState(ServerError):
    pass


class ConfigError(JobctlError):
    """A local problem: a certificate or key that cannot be read, a bad option."""

    exit_status = 2


class InvalidArgument(ConfigError, ValueError):
    """An argument the library cannot send (a negative job ID, an env name with
    ``=``, a NUL byte, a command line beyond the frame limit, ...)."""


class WaitTimeout(JobctlError):
    """``wait`` gave up: the job had not ended within the timeout. The
    connection it used was in the middle of an answer: it is closed, and the
    client's next request connects again by itself."""

    exit_status = 124


class ConnectionFailed(JobctlError):
    """No usable connection: cannot connect, TLS failed, refused, or lost."""

    exit_status = 3


class ServerRefused(ConnectionFailed):
    """The server refused the connection after TLS (certificate, role, version, load).

    ``code``: the error code of the server's refusal frame (``unavailable`` when
    it is busy or shutting down), None for a TLS alert or a bare close."""

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.code = code


_BY_CODE: dict[ErrorCode, type[ServerError]] = {
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.INVALID_STATE: InvalidState,
}


def server_error(code: ErrorCode, message: str) -> ServerError:
    return _BY_CODE.get(code, ServerError)(code, message)
