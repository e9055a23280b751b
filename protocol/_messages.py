"""The protocol's messages: one frozen dataclass per frame type, and their registry.

The classes live in ``_requests.py`` (client to server) and ``_replies.py``
(server to client); ``_base.py`` says what they share. This module groups them:
the type aliases, the per-side tuples, and the wire type -> class table the
decoder dispatches on.
"""

from __future__ import annotations

from ._base import PROTOCOL_MINOR, PROTOCOL_VERSION
from ._interactive import Attach, Detach, Input, InputEof, Resize, Resized
from ._replies import (
    Deleted,
    End,
    Error,
    JobList,
    OutputChunk,
    Pruned,
    Started,
    StatusResult,
    Stopped,
    Tick,
    Welcome,
)
from ._requests import (
    Delete,
    GetStatus,
    Hello,
    ListJobs,
    Output,
    Prune,
    Rerun,
    Start,
    Stop,
    Stream,
)

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import TypeAlias

ClientMessage: TypeAlias = (
    Hello | Start | Stop | GetStatus | ListJobs | Stream | Output | Delete | Prune
    | Attach | Input | InputEof | Resize | Detach | Rerun
)
ServerMessage: TypeAlias = (
    Welcome | Started | Stopped | StatusResult | JobList | Deleted | Pruned | OutputChunk | End
    | Error | Tick | Resized
)
#: Any message (usable with isinstance()).
Message: TypeAlias = ClientMessage | ServerMessage
#: The requests a client may send once welcomed.
Request: TypeAlias = (
    Start | Stop | GetStatus | ListJobs | Stream | Output | Delete | Prune | Attach | Rerun
)

CLIENT_MESSAGES: tuple[type[ClientMessage], ...] = (
    Hello, Start, Stop, GetStatus, ListJobs, Stream, Output, Delete, Prune,
    Attach, Input, InputEof, Resize, Detach, Rerun,
)
SERVER_MESSAGES: tuple[type[ServerMessage], ...] = (
    Welcome, Started, Stopped, StatusResult, JobList, Deleted, Pruned, OutputChunk, End, Error,
    Tick, Resized,
)
#: Wire type string -> message class.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (*CLIENT_MESSAGES, *SERVER_MESSAGES)
}

__all__ = [
    "CLIENT_MESSAGES",
    "Attach",
    "Detach",
    "Input",
    "InputEof",
    "Resize",
    "Resized",
    "MESSAGE_TYPES",
    "PROTOCOL_MINOR",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGES",
    "ClientMessage",
    "Delete",
    "Deleted",
    "End",
    "Error",
    "GetStatus",
    "Hello",
    "JobList",
    "ListJobs",
    "Message",
    "Output",
    "OutputChunk",
    "Prune",
    "Pruned",
    "Request",
    "Rerun",
    "ServerMessage",
    "Start",
    "StatusResult",
    "Started",
    "Stop",
    "Stopped",
    "Stream",
    "Tick",
    "Welcome",
]
