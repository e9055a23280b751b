"""Damage: a truncated or garbled job database, a lost -wal, a garbled output log.

Real jobd processes on state directories damaged the way disks and people
damage them. Each case is one clear line in the event log, never a traceback,
and an ID whose log exists is never given again.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import jobctl
from jobd.engine import _db
from jobd.engine._db import JobDB
from jobd.engine._store import Record
from protocol import JobState, JobStatus

from .conftest import JOBD, RUN_CWD, Pki, start_jobd
from .test_robust_faults import client


def history(state: Path, jobs: int) -> None:
    """Finished jobs 1..jobs written straight into the database."""
    now = time.time()
    db = JobDB.open(state)
    try:
        db.put_now([Record(JobStatus(
            id=i, owner="alice", argv=(b"true", b"x" * 200), state=JobState.EXITED,
            exit_code=0, created=now, started=now, ended=now)) for i in range(1, jobs + 1)])
    finally:
        db.close()


def failed_start(pki: Pki, state: Path) -> list[str]:
    """Run jobd on a state directory it must refuse; its stderr lines."""
    result = subprocess.run(
        [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"), "-C",
         pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0", "--state-dir", str(state)],
        capture_output=True, timeout=60, cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    return result.stderr.decode().splitlines()


def test_a_truncated_database_is_one_startup_failed_line(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    history(state, 3000)
    db = state / "jobs.db"
    os.truncate(db, db.stat().st_size // 2)
    lines = failed_start(pki, state)
    assert len(lines) == 1, lines
    assert re.search(r" error startup-failed reason=.*jobs\.db.*malformed.*restore jobs\.db "
                     r"from a backup", lines[0]), lines


def test_garbage_inside_the_database_is_found_at_start(pki: Pki, tmp_path: Path) -> None:
    """8 KiB of garbage in the middle: jobd refuses to start and says what to do. (It
    used to start, and then every list past the damage failed.)"""
    state = tmp_path / "state"
    history(state, 3000)
    db = state / "jobs.db"
    with db.open("r+b") as f:
        f.seek(db.stat().st_size // 2 // 4096 * 4096)
        f.write(os.urandom(8192))
    lines = failed_start(pki, state)
    assert len(lines) == 1, lines
    assert re.search(r" error startup-failed reason=\"the job database .*jobs\.db is damaged "
                     r"\(\d+ problems found by quick_check; the first: .*\): stop jobd, ",
                     lines[0]), lines


def test_a_lost_wal_never_gives_an_id_whose_log_exists(pki: Pki, tmp_path: Path) -> None:
    """jobd dies, and its -wal with the last commits is deleted: those jobs are gone
    from the list, but the IDs of their logs are never handed out again (it used to
    hand them out, and the new job's output went into the old job's log)."""
    state = tmp_path / "state"
    server = start_jobd(pki, state)
    try:
        with client(server) as c:
            ids = []
            for i in range(3):
                job = c.start(["echo", f"job {i}"]).id
                assert c.wait(job).describe() == "exited: 0"
                ids.append(job)
        server.proc.kill()
        server.proc.wait(30)
        kept = {job: (state / "logs" / "0" / f"{job}.log").read_bytes() for job in ids}
        (state / "jobs.db-wal").unlink()
        server = start_jobd(pki, state)
        line = server.wait_for_log(r"knows jobs up to ID 0, but logs/ holds the log of job 3")
        assert "new IDs start after 3" in line
        with client(server) as c:
            assert c.list() == []  # lost with the -wal: said, not hidden
            new = c.start(["echo", "new"]).id
            assert new == 4
            assert c.wait(new).describe() == "exited: 0"
        assert {job: (state / "logs" / "0" / f"{job}.log").read_bytes()
                for job in ids} == kept
    finally:
        server.stop()


def test_a_damaged_output_log_is_in_the_event_log(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_jobd(pki, state)
    try:
        with client(server) as c:
            job = c.start(["sh", "-c", "echo one; sleep 0.1; echo two"]).id
            assert c.wait(job).describe() == "exited: 0"
            log = state / "logs" / "0" / f"{job}.log"
            log.write_bytes(b"\xa7" + os.urandom(log.stat().st_size - 1))
            result = server.jobctl("alice", "output", str(job))
            assert result.returncode == 1 and b"output log corrupt" in result.stderr
        server.wait_for_log(rf"warning engine message=\"output log {re.escape(str(log))} is "
                            r"damaged: output log corrupt at offset 0; ")
        with client(server) as c:  # and nothing else is harmed
            assert c.status(job).describe() == "exited: 0"
            assert isinstance(c.start(["true"]), jobctl.JobStatus)
    finally:
        assert server.stop() == 0


def test_the_start_up_check_is_bounded_in_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A history too big to check within CHECK_SECONDS is checked in part: the start
    goes on, and the log says so."""
    state = tmp_path / "state"
    history(state, 3000)
    monkeypatch.setattr(_db, "CHECK_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        JobDB.open(state).close()
    assert "the check of the job database" in caplog.text
    assert "stopped after 0 s (a big history)" in caplog.text
