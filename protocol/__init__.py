"""jobd's wire protocol, sans-IO: bytes in, messages out (see docs/protocol.md)."""

from __future__ import annotations

from ._fields import FieldError
from ._status import ISOLATION_KINDS, STATUS_FIELDS, JobState, JobStatus, Limits

__all__ = ["ISOLATION_KINDS", "STATUS_FIELDS", "FieldError", "JobState", "JobStatus", "Limits"]
