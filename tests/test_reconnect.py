"""Clients survive a broken connection (issue 21 item 10).

``jobctl run``, ``stream`` and ``wait`` (and the library's) reconnect with
backoff and resume from the last position: nothing lost, nothing repeated,
until the job ends or ``--reconnect-timeout`` passes. The faults come from a
TCP proxy the tests start (tests/faultproxy.py: FIN, RST, a dead path, refused
connections) and from a jobd killed and started again on the same port.
"""

from __future__ import annotations

import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import jobctl
import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd
from .faultproxy import FaultProxy
from .test_client_lib import running_server

#: A job that counts, one line every 10 ms, until a gate file appears: it outlives
#: every fault the test injects, and its output shows any loss or repetition.
COUNTER = ("import os, sys, time\n"
           "i = 0\n"
           "while not os.path.exists({gate!r}):\n"
           "    print(i, flush=True); i += 1; time.sleep(0.01)\n"
           "print('end')\n")


def counter(gate: Path) -> list[str]:
    return ["python3", "-c", COUNTER.format(gate=str(gate))]


def _cli(jobd: JobdProcess, port: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p", str(port),
           "--liveness-timeout", "2", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=RUN_CWD)


class Lines:
    """A child's stdout read as it comes, so the test can wait for progress."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.data = bytearray()

    def wait_for_more(self, timeout: float = 60.0) -> None:
        """Until more output than now has arrived (at least one more whole line)."""
        assert self.proc.stdout is not None
        start = self.data.count(b"\n")
        fd = self.proc.stdout.fileno()
        while self.data.count(b"\n") <= start + 1:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no more output; stderr: {self.proc.stderr}"
            chunk = _read(fd)
            assert chunk, "the client ended early"
            self.data += chunk

    def finish(self, timeout: float = 120.0) -> tuple[int, bytes, bytes]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, bytes(self.data) + out, err


def _read(fd: int) -> bytes:
    import os

    return os.read(fd, 65536)


def _counted(data: bytes) -> None:
    """0, 1, 2 ... n, then ``end``: every line once, in order."""
    lines = data.split(b"\n")
    assert lines[-1] == b"" and lines[-2] == b"end", data[-200:]
    numbers = [int(x) for x in lines[:-2]]
    assert numbers == list(range(len(numbers))), "lines lost or repeated"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    yield path
    path.touch()  # whatever happened, the counter ends


def test_stream_survives_drops_resets_dead_paths_and_refusals(
        jobd: JobdProcess, gate: Path) -> None:
    job = int(jobd.jobctl("alice", "start", *counter(gate)).stdout)
    with FaultProxy(jobd.port) as proxy:
        follow = Lines(_cli(jobd, proxy.port, "stream", str(job)))
        follow.wait_for_more()
        proxy.drop()  # FIN
        proxy.wait_accepted(2)
        follow.wait_for_more()
        proxy.reset()  # RST
        proxy.wait_accepted(3)
        follow.wait_for_more()
        proxy.stall()  # nothing moves: the liveness timeout (2 s) notices
        proxy.wait_accepted(4)
        follow.wait_for_more()
        proxy.refuse()  # a restarting server: attempts fail, the client backs off
        proxy.drop()
        proxy.wait_accepted(6)
        proxy.accept()
        follow.wait_for_more()
        gate.touch()
        status, out, err = follow.finish()
    assert status == 0, err
    _counted(out)
    assert out == jobd.jobctl("alice", "output", str(job)).stdout


def _connected(jobd: JobdProcess, count: int, timeout: float = 60.0) -> None:
    """Until jobd has welcomed ``count`` connections in all (its debug log)."""
    with jobd._cond:
        assert jobd._cond.wait_for(
            lambda: sum(" connected " in f" {line} " or line.startswith("connected ")
                        for line in jobd.lines) >= count, timeout), jobd.lines


def test_run_and_wait_survive_a_reset(pki: Pki, tmp_path: Path, gate: Path) -> None:
    jobd = start_jobd(pki, tmp_path / "state", "--log-level", "debug")
    try:
        with FaultProxy(jobd.port) as proxy:
            run = Lines(_cli(jobd, proxy.port, "run", *counter(gate)))
            run.wait_for_more()
            job = jobd.jobctl("alice", "list", "--state", "running").stdout.split()[0].decode()
            _connected(jobd, 2)  # run's, list's
            wait = _cli(jobd, proxy.port, "wait", job)
            _connected(jobd, 3)
            proxy.reset()
            proxy.wait_accepted(4)  # both came back
            run.wait_for_more()
            gate.touch()
            status, out, err = run.finish()
            waited, werr = wait.communicate(timeout=120)
        assert status == 0, err
        _counted(out)
        assert wait.returncode == 0, werr
        assert waited == b"exited: 0\n"
    finally:
        jobd.stop()


def test_reconnect_timeout_zero_gives_up_at_once(jobd: JobdProcess, gate: Path) -> None:
    job = int(jobd.jobctl("alice", "start", *counter(gate)).stdout)
    with FaultProxy(jobd.port) as proxy:
        follow = Lines(_cli(jobd, proxy.port, "stream", "--reconnect-timeout", "0", str(job)))
        follow.wait_for_more()
        proxy.drop()
        status, _, err = follow.finish()
    assert status == 3
    assert b"connection lost" in err or b"closed by the server" in err, err
    assert proxy.accepted == 1


def test_a_deadline_ends_the_reconnecting(jobd: JobdProcess, gate: Path) -> None:
    job = int(jobd.jobctl("alice", "start", *counter(gate)).stdout)
    with FaultProxy(jobd.port) as proxy:
        follow = Lines(_cli(jobd, proxy.port, "stream", "--reconnect-timeout", "1", str(job)))
        follow.wait_for_more()
        proxy.refuse()
        proxy.drop()
        status, _, err = follow.finish()
    assert status == 3, err
    assert b"gave up reconnecting after 1s" in err, err


def test_stream_survives_a_jobd_crash_and_restart(pki: Pki, tmp_path: Path, gate: Path) -> None:
    """kill -9 of jobd while a client follows a job; jobd starts again on the same
    port: the client resumes and gets the rest of the log and the job's end."""
    state = tmp_path / "state"
    first = start_jobd(pki, state)
    second: JobdProcess | None = None
    try:
        job = int(first.jobctl("alice", "start", *counter(gate)).stdout)
        follow = Lines(_cli(first, first.port, "stream", str(job)))
        follow.wait_for_more()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        second = start_jobd(pki, state, port=first.port)
        status, out, err = follow.finish()
        assert status == 0, err
        assert second.jobctl("alice", "status", str(job)).stdout != b"running\n"
        assert out == second.jobctl("alice", "output", str(job)).stdout
        numbers = [int(x) for x in out.split(b"\n")[:-1] if x != b"end"]
        assert numbers == list(range(len(numbers)))
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_the_library_resumes_a_stream(pki: Pki, tmp_path: Path, gate: Path) -> None:
    async with running_server(pki, tmp_path / "state") as server:
        with FaultProxy(server.port) as proxy:
            async with jobctl.connect("127.0.0.1", proxy.port, server_name="localhost",
                                      liveness_timeout=2, **pki.files("alice")) as client:
                job = await client.start([*counter(gate)])
                out = bytearray()
                faults = [proxy.drop, proxy.reset, proxy.stall]
                async for event in client.stream(job.id, reconnect=60):
                    if isinstance(event, p.OutputChunk):
                        out += event.data
                        if out.count(b"\n") > 20 * (4 - len(faults)) and faults:
                            await trio.to_thread.run_sync(faults.pop(0))
                        elif not faults:
                            await trio.to_thread.run_sync(gate.touch)
                    else:
                        assert event.status.describe() == "exited: 0"
                assert proxy.accepted == 4
                assert (await client.status(job.id)).describe() == "exited: 0"
    _counted(bytes(out))


@pytest.mark.parametrize("library", ["blocking", "async"])
def test_a_wait_that_times_out_while_reconnecting_leaves_the_client_usable(
        jobd: JobdProcess, library: str) -> None:
    """The path to jobd breaks during a wait with a deadline (the blocking client's
    ``timeout=``, a Trio cancel scope) and stays broken until the deadline: the
    same client's next request connects again. (The
    blocking client used to answer "cannot send 'status': request while another is
    in progress", seen as a thread exception in the crash loop.)"""
    with FaultProxy(jobd.port) as proxy:
        files = {"server_name": "localhost", **jobd.pki.files("alice")}
        if library == "blocking":
            with jobctl.connect_blocking(jobd.address, proxy.port, **files) as client:
                job = client.start(["sleep", "1000"]).id
                proxy.refuse()
                proxy.drop()
                with pytest.raises(jobctl.WaitTimeout):
                    client.wait(job, timeout=1)
                proxy.accept()
                assert client.status(job).describe() == "running"
                assert client.stop(job, grace=0).describe() == "stopped"
        else:
            async def main() -> None:
                async with jobctl.connect(jobd.address, proxy.port, **files) as client:
                    job = (await client.start(["sleep", "1000"])).id
                    proxy.refuse()
                    proxy.drop()
                    with pytest.raises(trio.TooSlowError), trio.fail_after(1):
                        await client.wait(job)
                    proxy.accept()
                    assert (await client.status(job)).describe() == "running"
                    assert (await client.stop(job, grace=0)).describe() == "stopped"

            trio.run(main)
