"""jobctl: the jobd client library and command line.

Async (Trio)::

    async with jobctl.connect(address, port, certificate=..., key=..., ca=...) as client:
        status = await client.start(["echo", "hi"])

Blocking::

    with jobctl.connect_blocking(address, port, certificate=..., key=..., ca=...) as client:
        status = client.run(["echo", "hi"])   # output to our stdout; the final status
        sys.exit(jobctl.exit_status(status))

Trio is imported only when the async client is used, so the blocking client
(and the CLI, which uses it) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol import End, JobState, JobStatus, Limits, OutputChunk

from ._blocking import BlockingClient, connect_blocking
from ._core import exit_status
from ._errors import (
    ConfigError,
    ConnectionFailed,
    InvalidArgument,
    InvalidState,
    JobctlError,
    NotFound,
    PermissionDenied,
    ServerError,
    ServerRefused,
    WaitTimeout,
)

if TYPE_CHECKING:
    from ._async import Client, connect

__version__ = "0.1.0"

__all__ = [
    "BlockingClient", "Client", "ConfigError", "ConnectionFailed", "End", "InvalidArgument",
    "InvalidState", "JobState", "JobStatus", "JobctlError", "Limits", "NotFound", "OutputChunk",
    "PermissionDenied", "ServerError", "ServerRefused", "WaitTimeout", "connect",
    "connect_blocking", "exit_status",
]


def __getattr__(name: str) -> Any:
    if name in ("Client", "connect"):
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module 'jobctl' has no attribute {name!r}")
