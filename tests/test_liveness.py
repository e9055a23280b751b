"""A stopped server or a dead path is noticed while a request waits (issue 21 item 9).

jobd ticks while it works on a request when the client's hello asks for it;
jobctl takes a server silent for ``--liveness-timeout`` (default 30 s) as
gone. The tests use a short timeout; they wait for the client's exit with a
deadline, never for a fixed time.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import jobctl
import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki
from .faultproxy import FaultProxy
from .test_client_lib import running_server

LIVENESS = "2"
NO_RECONNECT = ["--reconnect-timeout", "0"]


def _follow(jobd: JobdProcess, port: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p", str(port),
           "--liveness-timeout", LIVENESS, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=RUN_CWD)


def _first_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the client printed nothing"
    return proc.stdout.readline()


@pytest.fixture
def chatty_then_silent(jobd: JobdProcess) -> Iterator[int]:
    """A job that says one line, then nothing for ten minutes."""
    result = jobd.jobctl("alice", "start", "sh", "-c", "echo ready; exec sleep 600")
    job = int(result.stdout)
    yield job
    jobd.jobctl("alice", "stop", "--grace", "0", str(job))


def _ends_silent(proc: subprocess.Popen[bytes]) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, err
    return err.decode()


def test_a_stopped_server_is_noticed(jobd: JobdProcess, chatty_then_silent: int) -> None:
    proc = _follow(jobd, jobd.port, "stream", *NO_RECONNECT,
                   str(chatty_then_silent))
    try:
        assert _first_line(proc) == b"ready\n"
        os.kill(jobd.proc.pid, signal.SIGSTOP)
        err = _ends_silent(proc)
    finally:
        os.kill(jobd.proc.pid, signal.SIGCONT)
    assert f"the server sent nothing for {LIVENESS}s" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["stream", "run"])
def test_a_dead_path_is_noticed(jobd: JobdProcess, chatty_then_silent: int,
                                command: str) -> None:
    """The path goes dead (the proxy stops moving bytes, no FIN, no RST) while the
    client follows a silent job."""
    with FaultProxy(jobd.port) as proxy:
        args = ([str(chatty_then_silent)] if command == "stream"
                else ["sh", "-c", "echo ready; exec sleep 600"])
        proc = _follow(jobd, proxy.port, command, *NO_RECONNECT, *args)
        assert _first_line(proc) == b"ready\n"
        proxy.stall()
        err = _ends_silent(proc)
    assert f"the server sent nothing for {LIVENESS}s" in err, err


async def test_ticks_keep_a_silent_stream_alive(pki: Pki, tmp_path: Path) -> None:
    """A job silent for longer than the liveness timeout: the stream lasts (jobd ticks),
    and the ticks never reach the caller."""
    async with running_server(pki, tmp_path) as server:
        connect = {"server_name": "localhost", **pki.files("alice")}
        async with jobctl.connect("127.0.0.1", server.port, liveness_timeout=0.9,
                                  **connect) as client:
            assert client.welcome.tick_interval == 0.3
            job = await client.start(["sh", "-c", "sleep 2.5; echo late"])
            events = [e async for e in client.stream(job.id)]
        assert [type(e) for e in events] == [p.OutputChunk, p.End]
        assert events[0].data == b"late\n"  # type: ignore[union-attr]


async def test_an_old_style_hello_gets_no_ticks(pki: Pki, tmp_path: Path) -> None:
    async with running_server(pki, tmp_path) as server:
        connect = {"server_name": "localhost", **pki.files("alice")}
        async with jobctl.connect("127.0.0.1", server.port, liveness_timeout=None,
                                  **connect) as client:
            assert client.welcome.tick_interval is None
            with trio.fail_after(30):
                job = await client.start(["true"])
                assert (await client.wait(job.id)).describe() == "exited: 0"
