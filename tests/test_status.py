from __future__ import annotations

import pytest

import protocol as p
from protocol import STATUS_FIELDS, FieldError, JobState, JobStatus, Limits


def full_status() -> JobStatus:
    return JobStatus(
        id=7, owner="alice", argv=(b"sh", b"-c", b"\xff"), state=JobState.KILLED,
        exit_code=None, signal="SIGKILL", error=None, oom=True, pid=123, created=1.5,
        started=2.0, ended=3.0, output_bytes=10, dropped_bytes=2,
        limits=Limits(memory=1 << 20, cpus=0.5, pids=8, io_read_bps=(("/dev/sda", 10),),
                      isolate=("pid", "net")),
        peak_memory=4096, cpu_time=0.25, stdin=True, tty=p.Terminal(30, 100, "xterm"),
        labels=(("env", "prod"),),
    )


def test_round_trip_covers_every_field() -> None:
    s = full_status()
    assert JobStatus.from_wire(s.to_wire()) == s
    for name in STATUS_FIELDS:
        if name not in {"exit_code", "error"}:
            assert name in s.to_wire(), name


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"state": "running"}, "running"),
        ({"state": "exited", "exit_code": 3}, "exited: 3"),
        ({"state": "stopped"}, "stopped"),
        ({"state": "killed", "signal": "SIGSEGV"}, "killed: SIGSEGV"),
        ({"state": "killed", "signal": "SIGKILL", "oom": True}, "killed: SIGKILL (out of memory)"),
        ({"state": "error", "error": "command not found: x"}, "error: command not found: x"),
    ],
)
def test_describe(kwargs: dict[str, object], text: str) -> None:
    assert JobStatus(id=1, owner="a", argv=(b"x",), **kwargs).describe() == text  # type: ignore[arg-type]


def test_validation_rejects_wrong_types() -> None:
    with pytest.raises(FieldError):
        JobStatus(id="1", owner="a", argv=(b"x",), state=JobState.RUNNING)  # type: ignore[arg-type]
    with pytest.raises(FieldError):
        JobStatus.from_wire(
            {"id": 1, "owner": "a", "argv": ["x"], "state": "running", "created": 0})
    with pytest.raises(FieldError):
        JobStatus.from_wire(
            {"id": 1, "owner": "a", "argv": [b"x"], "state": "bogus", "created": 0})
    with pytest.raises(FieldError):
        Limits(isolate=("user",))
    with pytest.raises(FieldError):
        Limits(memory=0)
