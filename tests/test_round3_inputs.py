"""Issue 22 items 12 and 13: inputs any client or user can send (a list's ``after``
beyond what job IDs can be; a config.toml built to explode or to crash jobctl)."""

from __future__ import annotations

import pytest

import protocol as p

from .conftest import JobdProcess
from .hostile import RawTLS, jobd, packed

__all__ = ["jobd"]  # the fixture


@pytest.mark.parametrize("request_", [
    {"type": "list", "after": 2**63},
    {"type": "list", "after": 2**64 - 1},
    {"type": "status", "job": 2**63},
    {"type": "delete", "job": 2**64 - 1},
    {"type": "stream", "job": 2**63, "position": 0},
])
def test_ids_beyond_sqlite_are_bad_requests(jobd: JobdProcess, request_: dict[str, object]) -> None:
    """``list`` with ``after`` >= 2**63 was an ``internal`` error and a "bug" log line
    any client could repeat: job IDs are bounded in the protocol (2**63 - 1)."""
    with RawTLS.to(jobd, "root") as conn:
        conn.hello()
        assert conn.send(packed(request_))
        reply = conn.read_until_closed(20)
    error = reply.only_error()
    assert error.code is p.ErrorCode.BAD_REQUEST, error
    assert "2**63" in error.message, error
    assert "request-failed" not in jobd.log_text()
    # jobd keeps serving
    assert jobd.jobctl("root", "list").returncode == 0


def test_jobctl_refuses_ids_the_protocol_refuses(jobd: JobdProcess) -> None:
    result = jobd.jobctl("root", "status", str(2**63))
    assert result.returncode == 2, result
    assert b"not a job ID" in result.stderr
    assert jobd.jobctl("root", "status", str(2**63 - 1)).stderr == b"process not found\n"
