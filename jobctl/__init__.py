"""jobctl: the jobd client library and command line.

Async (Trio)::

    async with jobctl.connect(address, port, certificate=..., key=..., ca=...) as client:
        status = await client.start(["echo", "hi"])

Blocking::

    with jobctl.connect_blocking(address, port, certificate=..., key=..., ca=...) as client:
        status = client.run(["echo", "hi"])   # output to our stdout; the final status
        sys.exit(jobctl.exit_status(status))

Many servers at once (Trio)::

    targets = [jobctl.Target("web1", "10.0.0.5", 8000, certificate=..., key=..., ca=...), ...]
    for outcome in await jobctl.fanout(targets, lambda client, target: client.list()):
        print(outcome.target.name, outcome.value if outcome.ok else outcome.error)

Trio is imported only when the async client is used, so the blocking client
(and the CLI, which uses it) start fast.
"""

from __future__ import annotations

from protocol import End, JobState, JobStatus, Limits, OutputChunk, Terminal

from ._blocking import BlockingAttach, BlockingClient, connect_blocking
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
from ._version import __version__ as __version__

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any

    from ._async import AsyncAttach, Client, connect
    from ._fanout import Outcome, fanout
    from ._profiles import Target


__all__ = [
    "AsyncAttach", "BlockingAttach", "Terminal",
    "BlockingClient", "Client", "ConfigError", "ConnectionFailed", "End", "InvalidArgument",
    "InvalidState", "JobState", "JobStatus", "JobctlError", "Limits", "NotFound", "Outcome",
    "OutputChunk", "PermissionDenied", "ServerError", "ServerRefused", "Target", "WaitTimeout",
    "connect", "connect_blocking", "exit_status", "fanout",
]


def __getattr__(name: str) -> Any:
    if name in ("Client", "connect", "AsyncAttach"):
        from . import _async

        return getattr(_async, name)
    if name in ("fanout", "Outcome"):
        from . import _fanout

        return getattr(_fanout, name)
    if name == "Target":
        from ._profiles import Target

        return Target
    raise AttributeError(f"module 'jobctl' has no attribute {name!r}")
