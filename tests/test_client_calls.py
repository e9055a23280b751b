"""jobctl/_calls.py without a socket: each call driven by hand, its answers scripted.

Both clients run these same calls (tests/test_client_lib.py drives them over
real TLS): here, what a call sends and makes of what it receives."""

from __future__ import annotations

from typing import Any

import pytest

import protocol as p
from jobctl import _calls as calls
from jobctl._errors import ConfigError, ConnectionFailed, NotFound

WELCOME = p.Welcome(version=p.PROTOCOL_VERSION, minor=p.PROTOCOL_MINOR, software="jobd test",
                    identity="alice", role="control", max_frame_size=p.MAX_FRAME_SIZE)
OLD = p.Welcome(version=p.PROTOCOL_VERSION, minor=0, software="jobd old",
                identity="alice", role="control", max_frame_size=p.MAX_FRAME_SIZE)


def status(job: int, state: p.JobState = p.JobState.EXITED) -> p.JobStatus:
    return p.JobStatus(id=job, owner="alice", argv=(b"true",), state=state, created=1.0,
                       pid=None if state is p.JobState.ERROR else 100 + job,
                       exit_code=0 if state is p.JobState.EXITED else None,
                       ended=None if state is p.JobState.RUNNING else 2.0)


class Script:
    """Drive a call: each Receive gets the next scripted event; returns what was
    sent, what was emitted and the result."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent: list[p.Message] = []
        self.emitted: list[p.OutputChunk | p.End] = []
        self.waits: list[float | None] = []

    def run(self, call: calls.Call[Any]) -> Any:
        value = None
        while True:
            try:
                op = call.send(value)
            except StopIteration as stop:
                assert self.answers == [], "not every answer was read"
                return stop.value
            value = None
            if isinstance(op, calls.Send):
                self.sent.append(op.message)
            elif isinstance(op, calls.Receive):
                self.waits.append(op.within)
                value = self.answers.pop(0)
            else:
                self.emitted.append(op.event)


def test_a_request_is_paired_with_its_answer_or_its_error() -> None:
    script = Script(p.StatusResult(status(4)))
    assert script.run(calls.status(4)) == status(4)
    assert script.sent == [p.GetStatus(4)]
    assert script.waits == [60.0]
    with pytest.raises(NotFound, match="process not found"):
        Script(p.Error(p.ErrorCode.NOT_FOUND, "process not found")).run(calls.status(4))
    with pytest.raises(ConnectionFailed, match="unexpected answer from the server: Deleted"):
        Script(p.Deleted(4)).run(calls.status(4))
    with pytest.raises(ConnectionFailed, match="connection closed by the server"):
        Script(p.CLOSED).run(calls.delete(4))


def test_list_fetches_every_page_after_the_last_id() -> None:
    script = Script(p.JobList((status(1), status(2)), True, None),
                    p.JobList((status(7),), True, None),
                    p.JobList((), False, None))
    jobs = script.run(calls.list_all(WELCOME, "alice", (p.JobState.EXITED,), None))
    assert [s.id for s in jobs] == [1, 2, 7]
    assert [m.after for m in script.sent if isinstance(m, p.ListJobs)] == [0, 2, 7]
    assert all(m.owner == "alice" for m in script.sent if isinstance(m, p.ListJobs))


def test_filters_are_refused_before_anything_is_sent_to_an_old_server() -> None:
    script = Script()
    with pytest.raises(ConfigError, match="list filters"):
        script.run(calls.list_all(OLD, "bob", (), None))
    with pytest.raises(ConfigError, match="prune"):
        script.run(calls.prune(OLD, 60.0))
    assert script.sent == []
    unfiltered = Script(p.JobList((status(1),), False, None))
    assert [s.id for s in unfiltered.run(calls.list_all(OLD, None, (), None))] == [1]


def test_wait_skips_output_and_asks_for_none_from_a_new_server() -> None:
    end = p.End(status(3), 10)
    script = Script(p.OutputChunk(1, b"old server output", 10), end)
    assert script.run(calls.wait(OLD, 3)) == status(3)
    assert script.sent == [p.Stream(3)]
    new = Script(end)
    assert new.run(calls.wait(WELCOME, 3)) == status(3)
    assert new.sent == [p.Stream(3, end_only=True)]
    assert new.waits == [None]  # no deadline of its own: the caller's


def test_run_starts_then_follows_from_the_first_byte() -> None:
    written: list[bytes] = []
    chunks = [p.OutputChunk(1, b"a", 5), p.OutputChunk(2, b"b", 9)]
    script = Script(p.Started(status(8, p.JobState.RUNNING)), *chunks, p.End(status(8), 9))
    final = script.run(calls.run(WELCOME, ["echo"], None, None, None, False,
                                 lambda chunk: written.append(chunk.data)))
    assert final == status(8)
    assert written == [b"a", b"b"]
    assert [type(m) for m in script.sent] == [p.Start, p.Stream]
    assert script.sent[1] == p.Stream(8, 0)
    never_ran = Script(p.Started(status(9, p.JobState.ERROR)))
    assert never_ran.run(calls.run(WELCOME, ["nope"], None, None, None, False, None)).id == 9
    assert [type(m) for m in never_ran.sent] == [p.Start]


def test_a_stream_emits_its_chunks_then_its_end_and_resumes_from_a_position() -> None:
    chunks = [p.OutputChunk(1, b"x", 20), p.OutputChunk(1, b"y", 30)]
    end = p.End(status(2), 30)
    script = Script(*chunks, end)
    request = calls.output_request(WELCOME, 2, 11, True, follow=True)
    assert request == p.Stream(2, 11, timestamps=True)
    assert script.run(calls.output(request)) is None
    assert script.emitted == [*chunks, end]
    assert calls.output_request(OLD, 2, 0, True, follow=False) == p.Output(2, 0)
    with pytest.raises(NotFound):
        Script(p.Error(p.ErrorCode.NOT_FOUND, "process not found")).run(
            calls.output(p.Output(2)))
