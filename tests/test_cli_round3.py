"""jobctl round 3 (issue 23): the rough edges a new user hit, labels, rerun, and
picking what to see; end to end against real jobd processes, driving the real CLI."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd

#: Generous bound for a whole CLI interaction on a loaded machine.
DEADLINE = 60.0


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout.decode()


def one_line(result: subprocess.CompletedProcess[bytes], fragment: str, status: int = 2) -> str:
    """A refusal: ``status``, one line on stderr holding ``fragment``, no traceback."""
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err)
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    return err


def read_until(fd: int, marker: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, seen
        chunk = os.read(fd, 4096)
        assert chunk, seen
        seen += chunk
    return seen


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def popen(jobd: JobdProcess, *args: str, who: str = "alice",
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args(who), "-a", jobd.address, "-p", str(jobd.port), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                            cwd=RUN_CWD)


# -- 4. run when jobd shuts down ------------------------------------------------------


def test_run_says_the_server_shut_down(pki: Pki, tmp_path: Path,
                                       procs: list[subprocess.Popen[bytes]]) -> None:
    server = start_jobd(pki, tmp_path / "state")
    try:
        proc = popen(server, "run", "sh", "-c", "echo ready; exec sleep 1000")
        procs.append(proc)
        assert proc.stdout is not None
        read_until(proc.stdout.fileno(), b"ready\n")
        server.proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 128 + signal.SIGINT, err  # the stop sequence's first step
        assert err == b"jobctl: job 1 stopped: the server is shutting down\n"
    finally:
        server.stop()


def test_run_says_another_client_stopped_it(jobd: JobdProcess,
                                            procs: list[subprocess.Popen[bytes]]) -> None:
    proc = popen(jobd, "run", "sh", "-c", "echo ready; exec sleep 1000")
    procs.append(proc)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"ready\n")
    ok(jobd.jobctl("alice", "stop", "1"))
    _, err = proc.communicate(timeout=DEADLINE)
    assert err == b"jobctl: job 1 stopped (by a stop request)\n"
