"""jobd's job engine: runs and supervises jobs and keeps their output on disk.

No network code: the server drives it through :class:`JobManager`, made by
:func:`open_job_manager`. See docs/engine.md for the theory of operation.
"""

from __future__ import annotations

from ._logformat import MAX_RECORD, TERMINAL_FD, TERMINAL_SIZE
from ._manager import LOST, JobManager, OutputReader, open_job_manager
from ._types import (
    BadLimits,
    BadPosition,
    EngineConfig,
    EngineError,
    InvalidState,
    JobNotFound,
    LimitExceeded,
    LimitPolicy,
    NoInput,
    OutputChunk,
    Unenforceable,
)

__all__ = [
    "LOST",
    "MAX_RECORD",
    "TERMINAL_FD",
    "TERMINAL_SIZE",
    "BadLimits",
    "BadPosition",
    "EngineConfig",
    "EngineError",
    "InvalidState",
    "JobManager",
    "JobNotFound",
    "LimitExceeded",
    "LimitPolicy",
    "NoInput",
    "OutputChunk",
    "OutputReader",
    "Unenforceable",
    "open_job_manager",
]
