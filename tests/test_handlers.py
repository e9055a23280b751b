"""jobd/_handlers.py without a socket: each request's handler, driven with a real
job manager, a real event log and a list that collects a stream's chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import protocol as p
from jobd._attach import INPUT_QUEUE, Attachments
from jobd._auth import Identity, Role
from jobd._handlers import HANDLERS, STREAMS, Context, answer, job_environment
from jobd._log import EventLog
from jobd.engine import JobManager, OutputChunk, open_job_manager

from .engine_helpers import TIMEOUT, config

ALICE = Identity("alice", Role.CONTROL)
BOB = Identity("bob", Role.CONTROL)
EVE = Identity("eve", Role.OBSERVE)
ROOT = Identity("root", Role.ADMIN)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with open_job_manager(config(tmp_path)) as m:
        yield m


class Caller:
    """A handler's context for one identity; the chunks it would send and the log."""

    def __init__(self, manager: JobManager, identity: Identity) -> None:
        self.chunks: list[OutputChunk] = []
        self.log = io.StringIO()
        self.ctx = Context(identity=identity, manager=manager,
                           log=EventLog(stream=self.log), peer="[::1]:4000",
                           job_env=job_environment(), max_jobs_per_user=None,
                           starting=self._starting, send_chunk=self._send_chunk,
                           attachments=Attachments(), take_input=self._take_input)
        #: What the next attach's input route carries (as the connection's reader would).
        self.input: list[p.Message] = []

    def _take_input(self) -> trio.MemoryReceiveChannel[p.Message]:
        send, receive = trio.open_memory_channel[p.Message](INPUT_QUEUE)
        for message in self.input:
            send.send_nowait(message)
        self.input = []
        return receive

    @contextlib.asynccontextmanager
    async def _starting(self, identity: Identity) -> AsyncIterator[None]:
        yield

    async def _send_chunk(self, chunk: OutputChunk) -> None:
        self.chunks.append(chunk)

    async def ask(self, request: p.Message) -> p.Message:
        with trio.fail_after(TIMEOUT):
            return await answer(self.ctx, request)


def error(reply: p.Message) -> tuple[p.ErrorCode, str]:
    assert isinstance(reply, p.Error), reply
    return reply.code, reply.message


def test_every_request_has_a_handler() -> None:
    requests = {p.Start, p.Stop, p.GetStatus, p.Delete, p.ListJobs, p.Prune, p.Stream, p.Output,
                p.Attach, p.Rerun}
    assert set(HANDLERS) == requests
    assert {p.Stream, p.Output, p.Attach} == STREAMS


async def test_start_output_and_end(manager: JobManager) -> None:
    alice = Caller(manager, ALICE)
    started = await alice.ask(p.Start((b"sh", b"-c", b"echo out; echo err >&2")))
    assert isinstance(started, p.Started)
    assert started.status.owner == "alice"
    end = await alice.ask(p.Stream(started.status.id))
    assert isinstance(end, p.End)
    assert end.status.state is p.JobState.EXITED
    assert b"".join(c.data for c in alice.chunks if c.fd == 1) == b"out\n"
    assert b"".join(c.data for c in alice.chunks if c.fd == 2) == b"err\n"
    assert end.position == alice.chunks[-1].position


async def test_another_callers_job_is_not_found(manager: JobManager) -> None:
    alice, bob = Caller(manager, ALICE), Caller(manager, BOB)
    started = await alice.ask(p.Start((b"true",)))
    assert isinstance(started, p.Started)
    job = started.status.id
    for request in (p.GetStatus(job), p.Stop(job), p.Delete(job), p.Output(job)):
        assert error(await bob.ask(request)) == (p.ErrorCode.NOT_FOUND, "process not found")
    assert bob.chunks == []
    assert "request-denied" in bob.log.getvalue()
    listed = await bob.ask(p.ListJobs())
    assert isinstance(listed, p.JobList)
    assert listed.jobs == ()
    listed = await Caller(manager, EVE).ask(p.ListJobs())  # observe reads every job
    assert isinstance(listed, p.JobList)
    assert [s.id for s in listed.jobs] == [job]


async def test_role_refusals_are_permission_denied_and_logged(manager: JobManager) -> None:
    eve = Caller(manager, EVE)
    code, message = error(await eve.ask(p.Start((b"true",))))
    assert (code, message) == (p.ErrorCode.PERMISSION_DENIED,
                               "permission denied: role observe may not start jobs")
    assert "start-refused" in eve.log.getvalue()
    code, _ = error(await Caller(manager, ALICE).ask(p.Prune(0.0)))
    assert code is p.ErrorCode.PERMISSION_DENIED
    pruned = await Caller(manager, ROOT).ask(p.Prune(0.0))
    assert isinstance(pruned, p.Pruned)


async def test_delete_of_a_running_job_is_invalid_state(manager: JobManager) -> None:
    alice = Caller(manager, ALICE)
    started = await alice.ask(p.Start((b"sleep", b"60")))
    assert isinstance(started, p.Started)
    job = started.status.id
    assert error(await alice.ask(p.Delete(job))) == (
        p.ErrorCode.INVALID_STATE, "process is running: stop it before deleting it")
    stopped = await alice.ask(p.Stop(job, grace=0.0))
    assert isinstance(stopped, p.Stopped)
    assert await alice.ask(p.Delete(job)) == p.Deleted(job)
    assert error(await alice.ask(p.GetStatus(job)))[0] is p.ErrorCode.NOT_FOUND


async def test_unexpected_request_and_a_bug_are_answered(manager: JobManager) -> None:
    alice = Caller(manager, ALICE)
    assert error(await alice.ask(p.Hello())) == (p.ErrorCode.BAD_REQUEST,
                                                 "unexpected request Hello")
    started = await alice.ask(p.Start((b"echo", b"hi")))
    assert isinstance(started, p.Started)
    await alice.ask(p.Stream(started.status.id, end_only=True))

    async def broken(chunk: OutputChunk) -> None:
        raise ValueError("a bug")

    buggy = dataclasses.replace(alice.ctx, send_chunk=broken)
    assert error(await answer(buggy, p.Output(started.status.id))) == (
        p.ErrorCode.INTERNAL, "internal error: the request failed")
    assert "request-failed" in alice.log.getvalue()



async def test_rerun_and_label_filters(manager: JobManager, tmp_path: Path) -> None:
    """Issue 23: rerun repeats the start as asked (the env unmerged, merged again);
    labels go into the status and the list filter; others' jobs are not found."""
    alice, bob, root, eve = (Caller(manager, who) for who in (ALICE, BOB, ROOT, EVE))
    started = await alice.ask(p.Start(
        (b"sh", b"-c", b"echo $A $HOME"), cwd=str(tmp_path).encode(), env=((b"A", b"1"),),
        env_merge=True, labels=(("env", "prod"),)))
    assert isinstance(started, p.Started)
    first = started.status
    await alice.ask(p.Stream(first.id, end_only=True))
    again = await alice.ask(p.Rerun(first.id))
    assert isinstance(again, p.Started)
    assert again.status.id != first.id and again.status.labels == (("env", "prod"),)
    await alice.ask(p.Stream(again.status.id, end_only=True))
    alice.chunks.clear()
    await alice.ask(p.Output(again.status.id))
    home = job_environment().get(b"HOME", b"")  # issue 22: none unless --job-env names it
    assert b"".join(c.data for c in alice.chunks) == (b"1 " + home if home else b"1") + b"\n"
    _, spec = manager.spec(again.status.id)
    assert spec is not None and spec["env"] == [[b"A", b"1"]] and spec["env_merge"]
    assert error(await bob.ask(p.Rerun(first.id))) == (p.ErrorCode.NOT_FOUND,
                                                       "process not found")
    assert error(await eve.ask(p.Rerun(first.id)))[0] is p.ErrorCode.PERMISSION_DENIED
    by_root = await root.ask(p.Rerun(first.id))
    assert isinstance(by_root, p.Started) and by_root.status.owner == "root"
    listed = await root.ask(p.ListJobs(labels=(("env", "prod"),)))
    assert isinstance(listed, p.JobList)
    assert [s.id for s in listed.jobs] == [first.id, again.status.id, by_root.status.id]
    none = await root.ask(p.ListJobs(labels=(("env", "prod"), ("team", "x"))))
    assert isinstance(none, p.JobList) and none.jobs == ()
    # A job whose record kept no start (an older jobd's) cannot be repeated.
    old = await manager.start([b"true"], "alice")
    await manager.wait(old.id)
    code, message = error(await alice.ask(p.Rerun(old.id)))
    assert code is p.ErrorCode.INVALID_STATE and "older jobd" in message


async def test_attach_types_into_a_job_and_ends_with_it(manager: JobManager) -> None:
    alice = Caller(manager, ALICE)
    started = await alice.ask(p.Start((b"tr", b"a-z", b"A-Z"), stdin=True))
    assert isinstance(started, p.Started) and started.status.stdin
    job = started.status.id
    alice.input = [p.Input(b"hello\n"), p.InputEof()]
    end = await alice.ask(p.Attach(job, 0, input=True))
    assert isinstance(end, p.End) and end.status.exit_code == 0
    assert b"".join(c.data for c in alice.chunks) == b"HELLO\n"
    assert "attached" in alice.log.getvalue() and "input=true" in alice.log.getvalue()


async def test_attach_refusals(manager: JobManager) -> None:
    alice, eve, bob = Caller(manager, ALICE), Caller(manager, EVE), Caller(manager, BOB)
    started = await alice.ask(p.Start((b"sleep", b"60"), stdin=True))
    assert isinstance(started, p.Started)
    job = started.status.id
    assert error(await eve.ask(p.Attach(job, input=True))) == (
        p.ErrorCode.PERMISSION_DENIED, "permission denied: role observe may not type into jobs")
    assert error(await bob.ask(p.Attach(job))) == (p.ErrorCode.NOT_FOUND, "process not found")
    # observe may watch; a detach ends the attach with the status now, running.
    eve.input = [p.Detach()]
    end = await eve.ask(p.Attach(job))
    assert isinstance(end, p.End) and end.status.running
    plain = await alice.ask(p.Start((b"sleep", b"60")))
    assert isinstance(plain, p.Started)
    code, message = error(await alice.ask(p.Attach(plain.status.id, input=True)))
    assert code is p.ErrorCode.INVALID_STATE and "no input" in message
    await alice.ask(p.Stop(job, grace=0.0))
    await alice.ask(p.Stop(plain.status.id, grace=0.0))


def test_clients_attached_to_one_job_are_bounded() -> None:
    from jobd._attach import MAX_ATTACHED_PER_JOB
    from jobd.engine import LimitExceeded

    table = Attachments(per_job=2)
    with table.hold(7), table.hold(7):
        with pytest.raises(LimitExceeded, match="too many clients attached to job 7"), \
                table.hold(7):
            pass
        with table.hold(8):  # another job's count is its own
            assert len(table) == 3
    assert len(table) == 0
    assert Attachments().per_job == MAX_ATTACHED_PER_JOB == 64
