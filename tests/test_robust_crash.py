"""Crashes: kill -9 of jobd at the worst moments, and a crash loop with a disk that fills.

Real jobd processes on real state directories (a small tmpfs, mounted here:
the tests run as root, as CI does, on a fresh machine). What must hold after
any kill -9: no process jobd started outlives the restart unsupervised, no
job ID a client was given comes back, nothing a client was told is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd
from .test_robust_faults import client

#: Deadline for a condition a test waits for (never a fixed sleep).
TIMEOUT = 30.0


def processes_with(marker: str) -> list[int]:
    """The live processes whose command line holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(b")") + 2:][:1] not in b"ZX":
            found.append(int(name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in b"ZX"


def jobctl_popen(server: JobdProcess, who: str, *args: str) -> subprocess.Popen[bytes]:
    """The real jobctl, not waited for."""
    return subprocess.Popen([*JOBCTL, *server.pki.client_args(who), "-a", server.address,
                             "-p", str(server.port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=RUN_CWD)


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{name}/stat").read_bytes()
                if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                    out.append(int(name))
    return out


def wait_until(condition: object, what: str) -> None:
    """Wait for a condition that no event announces (another process's state), with a
    deadline: a short back-off between looks, bounded by TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    delay = 0.001
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.contextmanager
def killing(marker: str) -> Iterator[None]:
    """Kill whatever the test left with ``marker`` in its command line."""
    try:
        yield
    finally:
        for pid in processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("tracking", ["cgroup", "gate"])
def test_a_kill_between_spawn_and_record_leaves_no_orphan(
        pki: Pki, tmp_path: Path, tracking: str) -> None:
    """jobd is killed after it spawned a job's process and before the record naming it
    was committed (the database is held locked meanwhile). The restart must find and
    kill that process (cgroup), or it must never have run the command (gate). (It used
    to be re-parented to PID 1 and never stopped.)"""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    state = tmp_path / "state"
    server = start_jobd(pki, state, "--job-tracking", tracking)
    with killing(marker):
        try:
            assert f"tracking={tracking}" in server.wait_for_log(r"info cgroups ")
            locker = sqlite3.connect(state / "jobs.db", isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")  # the writer waits (busy_timeout)
                starter = jobctl_popen(server, "alice", "start", "sleep", marker)
                jobd = server.proc.pid
                # The job's process exists (the helper, in gate mode), its record not yet.
                wait_until(lambda: children_of(jobd), "jobd to spawn the job")
                spawned = children_of(jobd)
                server.proc.kill()
                assert server.proc.wait(TIMEOUT) == -signal.SIGKILL
                out, _ = starter.communicate(timeout=TIMEOUT)
                assert (starter.returncode, out) == (3, b"")  # never acknowledged
            finally:
                locker.close()
            server = start_jobd(pki, state, "--job-tracking", tracking)
            # Ready: whatever the dead jobd had spawned is gone, and the command never
            # ran unsupervised.
            assert processes_with(marker) == []
            assert [pid for pid in spawned if alive(pid)] == []
            if tracking == "cgroup":
                server.wait_for_log(r"killed 1 processes left over by a previous jobd")
            with client(server) as c:
                assert c.list() == []
        finally:
            server.stop()
