"""The library's run/wait, str environments, and its errors for bad arguments
(issue 14): the blocking client against a real jobd process, the Trio client
against an in-process server."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

import jobctl
import protocol as p

from .conftest import JobdProcess, Pki
from .test_client_lib import running_server


def blocking(jobd: JobdProcess) -> jobctl.BlockingClient:
    return jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                   **jobd.pki.files("alice"))


def test_blocking_run_and_wait(jobd: JobdProcess) -> None:
    chunks: list[p.OutputChunk] = []
    with blocking(jobd) as client:
        status = client.run(["sh", "-c", "echo out; echo err >&2; exit 4"],
                            on_output=chunks.append)
        assert status.describe() == "exited: 4" and jobctl.exit_status(status) == 4
        assert b"".join(c.data for c in chunks if c.fd == 1) == b"out\n"
        assert b"".join(c.data for c in chunks if c.fd == 2) == b"err\n"
        never = client.run(["nosuchcmd-jobd"])
        assert never.state is p.JobState.ERROR and jobctl.exit_status(never) == 1
        job = client.start(["sh", "-c", "kill -USR1 $$"])
        ended = client.wait(job.id)
        assert ended.describe() == "killed: SIGUSR1"
        assert jobctl.exit_status(ended) == 128 + signal.SIGUSR1
        # the connection goes on after a wait
        assert client.status(job.id) == ended
        sleeper = client.start(["sleep", "1000"])
        with pytest.raises(jobctl.WaitTimeout) as info:
            client.wait(sleeper.id, timeout=0.2)
        assert info.value.exit_status == 124
        # "wait a while, then stop" (issue 23): the same client goes on.
        assert client.stop(sleeper.id, grace=0).describe() == "stopped"
        assert client.status(sleeper.id).describe() == "stopped"
        # A stream abandoned mid-answer leaves it usable too.
        talker = client.start(["sh", "-c", "echo hi; sleep 1000"])
        events = client.stream(talker.id)
        assert isinstance(next(events), p.OutputChunk)
        events.close()
        assert client.stop(talker.id, grace=0).describe() == "stopped"


def test_blocking_env_as_str_and_bytes(jobd: JobdProcess, tmp_path: Path) -> None:
    chunks: list[p.OutputChunk] = []
    with blocking(jobd) as client:
        status = client.run(["/usr/bin/env"], cwd=str(tmp_path),
                            env={"A": "1", b"B": b"\xff"}, on_output=chunks.append)
        assert status.describe() == "exited: 0"
        assert sorted(b"".join(c.data for c in chunks).splitlines()) == [b"A=1", b"B=\xff"]
        chunks.clear()
        client.run(["sh", "-c", 'echo "$X ${PATH:+has-path}"'], env={"X": "merged"},
                   env_merge=True, on_output=chunks.append)
        assert b"".join(c.data for c in chunks) == b"merged has-path\n"


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda c: c.status(-1), "job must not be negative"),
    (lambda c: c.status(1 << 64), r"below 2\*\*64"),
    (lambda c: c.stop(1, grace=float("nan")), "grace"),
    (lambda c: c.start([]), "argv must not be empty"),
    (lambda c: c.start("ls"), "not a single string"),
    (lambda c: c.start(["ls"], env={"A=B": "x"}), "no '='"),
    (lambda c: c.start(["ls"], env={"A": 3}), "must be bytes or str"),
    (lambda c: c.start(["a\0b"]), "NUL"),
    (lambda c: c.start(["x" * (2 << 20)]), "longer than"),
    (lambda c: c.wait(1, timeout=-1), "timeout"),
])
def test_bad_arguments_are_jobctl_errors(jobd: JobdProcess, call: object, fragment: str) -> None:
    with blocking(jobd) as client:
        with pytest.raises(jobctl.InvalidArgument, match=fragment) as info:
            call(client)  # type: ignore[operator]
        assert isinstance(info.value, jobctl.JobctlError | ValueError)
        assert not isinstance(info.value, p.FieldError)
        assert client.list() == []  # nothing sent, and the connection still works


async def test_async_run_wait_and_errors(pki: Pki, tmp_path: Path) -> None:
    connect = {"server_name": "localhost", **pki.files("alice")}
    async with running_server(pki, tmp_path) as server, \
            jobctl.connect("127.0.0.1", server.port, **connect) as client:
        chunks: list[p.OutputChunk] = []
        status = await client.run(["sh", "-c", "echo $GREETING; exit 2"],
                                  env={"GREETING": "hi"}, on_output=chunks.append)
        assert jobctl.exit_status(status) == 2
        assert b"".join(c.data for c in chunks) == b"hi\n"
        job = await client.start(["sh", "-c", "sleep 0.2"])
        assert (await client.wait(job.id)).describe() == "exited: 0"
        with pytest.raises(jobctl.InvalidArgument):
            await client.status(-5)
        with pytest.raises(jobctl.InvalidArgument):
            await client.start([b"ok"], env={b"": b"x"})
        sleeper = await client.start(["sleep", "1000"])
        with trio.move_on_after(0.2) as scope:
            await client.wait(sleeper.id)
        assert scope.cancelled_caught
        # Issue 23: the same client goes on (it connects again by itself).
        assert (await client.stop(sleeper.id, grace=0)).describe() == "stopped"
        assert (await client.status(sleeper.id)).describe() == "stopped"


def test_server_honours_protocol_1_1_flags(jobd: JobdProcess) -> None:
    """What `wait` and `--timestamps` rely on: a 1.1 server sends no output for
    `end_only`, and a time with every chunk for `timestamps`."""
    with blocking(jobd) as client:
        assert client.welcome.minor >= 1
        job = client.start(["sh", "-c", "head -c 300000 /dev/zero; echo; sleep 0.1; echo two"])
        events = list(client._output(p.Stream(job.id, end_only=True)))
        assert len(events) == 1 and isinstance(events[0], p.End)
        assert events[0].status.describe() == "exited: 0"
        events = list(client._output(p.Output(job.id, end_only=True)))
        assert [type(e) for e in events] == [p.End]
        before = job.created - 1
        chunks = [e for e in client.output(job.id, timestamps=True)
                  if isinstance(e, p.OutputChunk)]
        assert b"".join(c.data for c in chunks) == bytes(300000) + b"\ntwo\n"
        times = [c.time for c in chunks]
        assert all(t is not None and before <= t for t in times), times
        assert times == sorted(times)  # type: ignore[type-var]
        # one chunk per record: never more than one pipe read (256 KiB) each
        assert all(len(c.data) <= 256 * 1024 for c in chunks) and len(chunks) >= 3
        # resuming from a timestamped chunk's position continues right after it
        rest = [e for e in client.output(job.id, chunks[0].position, timestamps=True)
                if isinstance(e, p.OutputChunk)]
        assert [c.data for c in rest] == [c.data for c in chunks[1:]]
