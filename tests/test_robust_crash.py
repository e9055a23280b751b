"""Crashes: kill -9 of jobd at the worst moments, and a crash loop with a disk that fills.

Real jobd processes on real state directories (a small tmpfs, mounted here:
the tests run as root, as CI does, on a fresh machine). What must hold after
any kill -9: no process jobd started outlives the restart unsupervised, no
job ID a client was given comes back, nothing a client was told is lost.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobctl
import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd
from .test_robust_faults import client, fill, small_tmpfs

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
                # From jobd's leaf; or (issue 23: every job is moved into a cgroup of
                # its own to be measured) from the job's cgroup.
                server.wait_for_log(r"killed 1 processes left over by a previous jobd|"
                                    r"removed cgroup job-1 left over by a previous jobd, "
                                    r"after killing its processes")
            with client(server) as c:
                assert c.list() == []
        finally:
            server.stop()


# -- the crash loop ---------------------------------------------------------------------

#: Restarts of the loop, alternating cgroup and gate tracking (about 2 s each).
CYCLES = 10


class Ledger:
    """What clients were told: every acknowledged start, end and delete."""

    def __init__(self) -> None:
        self.started: set[int] = set()
        self.ended: dict[int, str] = {}
        self.deleted: set[int] = set()
        self.deleting: set[int] = set()  # asked, maybe done, not acknowledged
        self.refusals = 0
        self.errors: list[str] = []

    def new_id(self, job: int) -> None:
        if job in self.started:
            self.errors.append(f"ID {job} was given again")
        self.started.add(job)


def workload(server: JobdProcess, ledger: Ledger, rng: random.Random, marker: str,
             disk: Path, ops: int, reached: threading.Event) -> None:
    """Starts (long jobs with a child, short jobs), waits, ends, deletes, and a disk that
    fills and empties, until jobd is killed under it. Sets ``reached`` after ``ops``."""
    filler = disk / "filler"
    done = 0
    try:
        with client(server) as c:
            while True:
                if done == ops:
                    reached.set()
                done += 1
                roll = rng.random()
                try:
                    if roll < 0.08:
                        if filler.exists():
                            filler.unlink()
                        else:
                            fill(filler)
                    elif roll < 0.35:
                        status = c.start(["sh", "-c", f"sleep {marker} & exec sleep {marker}"])
                        ledger.new_id(status.id)
                    elif roll < 0.65:
                        job = c.start(["sh", "-c", "echo out; echo err >&2"]).id
                        ledger.new_id(job)
                        ledger.ended[job] = c.wait(job, timeout=0.5).describe()
                    elif roll < 0.8:
                        running = [s.id for s in c.list() if s.state is p.JobState.RUNNING]
                        if running:
                            job = rng.choice(running)
                            ledger.ended[job] = c.stop(job, grace=0).describe()
                    else:
                        ended = [job for job in ledger.ended if job not in ledger.deleting]
                        if ended:
                            job = rng.choice(ended)
                            ledger.deleting.add(job)
                            c.delete(job)
                            ledger.deleted.add(job)
                except (jobctl.ServerError, jobctl.WaitTimeout):
                    ledger.refusals += 1  # a full disk: refused, or not ended yet
    except (jobctl.ConnectionFailed, OSError):
        pass  # jobd was killed
    finally:
        reached.set()


def check(server: JobdProcess, ledger: Ledger, marker: str, seed: int) -> None:
    """After a restart: no orphan, nothing acknowledged lost, no ID given twice."""
    assert processes_with(marker) == [], f"orphans after a restart (seed {seed})"
    assert ledger.errors == [], (ledger.errors, seed)
    with client(server) as c:
        for job in sorted(ledger.started):
            try:
                status = c.status(job)
            except jobctl.NotFound:
                assert job in ledger.deleting, f"job {job} lost (seed {seed})"
                continue
            assert job not in ledger.deleted, f"deleted job {job} is back (seed {seed})"
            assert not status.running, (status, seed)  # all were lost or ended
            if job in ledger.ended:
                assert status.describe() == ledger.ended[job], (job, status, seed)


def test_crash_loop(pki: Pki, tmp_path: Path) -> None:
    """kill -9 at random moments during starts, ends and deletes, on a disk that fills:
    0 orphans, 0 reused IDs, 0 acknowledged changes lost. (Before: orphans, and IDs given
    twice after a crash on a full disk.)"""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    marker = f"3600.{seed}"
    ledger = Ledger()
    with small_tmpfs(tmp_path / "small", "4m") as disk, killing(marker):
        state = disk / "state"
        server = start_jobd(pki, state)
        try:
            for cycle in range(CYCLES):
                reached = threading.Event()
                worker = threading.Thread(target=workload, args=(
                    server, ledger, rng, marker, disk, rng.randrange(3, 25), reached))
                worker.start()
                assert reached.wait(TIMEOUT), f"the workload is stuck (seed {seed})"
                time.sleep(rng.uniform(0, 0.02))  # a random moment within the next request
                server.proc.kill()
                server.proc.wait(TIMEOUT)
                worker.join(TIMEOUT)
                assert not worker.is_alive()
                if rng.random() < 0.5:  # space comes back, or not, before the restart
                    with contextlib.suppress(FileNotFoundError):
                        (disk / "filler").unlink()
                tracking = "gate" if cycle % 2 else "cgroup"
                server = start_jobd(pki, state, "--job-tracking", tracking)
                check(server, ledger, marker, seed)
            with contextlib.suppress(FileNotFoundError):
                (disk / "filler").unlink()
            assert server.stop() == 0
            assert processes_with(marker) == []
        finally:
            server.stop()
    assert len(ledger.started) > CYCLES  # the loop did work
