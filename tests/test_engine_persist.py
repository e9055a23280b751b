"""Job engine: records on disk, the ID counter, restarts, and jobs lost by a dead jobd."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import pytest
import trio

from jobd.engine import LOST, EngineError, InvalidState, _db, open_job_manager
from jobd.engine._db import JobDB
from jobd.engine._procs import boot_id
from jobd.engine._store import Record, Store
from protocol import JobState, JobStatus
from tests.engine_helpers import (
    TIMEOUT,
    Events,
    alive,
    collect,
    config,
    data,
    log_file,
    start_ticks,
    wait_for_output,
)

Spawner = Callable[..., Awaitable[trio.Process]]


def stale_record(tmp_path: Path, job_id: int, pid: int, proc_start: int,
                 boot: str | None = None) -> None:
    """What a jobd that died while the job ran leaves behind."""
    now = time.time()
    status = JobStatus(id=job_id, owner="alice", argv=(b"sleep", b"1000"),
                       state=JobState.RUNNING, pid=pid, created=now, started=now)
    db = JobDB.open(tmp_path / "state")
    try:
        db.put_now([Record(status, proc_start, boot_id() if boot is None else boot)])
    finally:
        db.close()


@pytest.fixture
async def spawned() -> AsyncIterator[Spawner]:
    """Starts processes outside any jobd (own session); kills and reaps them all at the end."""
    procs: list[trio.Process] = []

    async def spawn(*argv: str) -> trio.Process:
        proc = await trio.lowlevel.open_process(list(argv), start_new_session=True,
                                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_restart_keeps_records_output_and_the_id_counter(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        first = await manager.start([b"sh", b"-c", b"printf 'a\\0b'; echo err >&2; exit 4"],
                                    "alice")
        await manager.wait(first.id)
        missing = await manager.start([b"nosuchcmd"], "bob")
        running = await manager.start([b"sleep", b"1000"], "carol")
        before = manager.list()
        output = await collect(manager.read_output(first.id))
    async with open_job_manager(config(tmp_path)) as manager:
        after = manager.list()
        assert after[:2] == before[:2]
        assert after[2].describe() == "stopped" and after[2].id == running.id
        assert await collect(manager.read_output(first.id)) == output
        assert data(output, 1) == b"a\0b" and data(output, 2) == b"err\n"
        assert await collect(manager.read_output(missing.id)) == []
        assert (await manager.start([b"true"], "alice")).id == running.id + 1


async def test_a_deleted_id_never_comes_back(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        ids = [(await manager.start([b"true"], "alice")).id for _ in range(3)]
        for i in ids:
            await manager.wait(i)
        await manager.delete(ids[2])
        await manager.delete(ids[1])
    async with open_job_manager(config(tmp_path)) as manager:
        assert [s.id for s in manager.list()] == [1]
        assert (await manager.start([b"true"], "alice")).id == 4
        await manager.wait(4)
        await manager.delete(4)
    async with open_job_manager(config(tmp_path)) as manager:
        assert (await manager.start([b"true"], "alice")).id == 5


async def test_deleting_the_newest_job_after_a_restart_keeps_its_id_retired(
        tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        for _ in range(2):
            await manager.wait((await manager.start([b"true"], "alice")).id)
    async with open_job_manager(config(tmp_path)) as manager:
        await manager.delete(2)  # the mark on disk is still 0: it must be written now
    async with open_job_manager(config(tmp_path)) as manager:
        assert (await manager.start([b"true"], "alice")).id == 3


async def test_an_end_on_a_full_disk_is_shown_only_once_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An end that cannot be committed is not acknowledged: the job shows running,
    stop refuses with a clear error, and jobd writes the end once space is back.
    (It used to be acknowledged from memory and lost by a crash.)"""
    full = [False]
    real_puts = _db.apply_puts

    def apply_puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
        if full[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real_puts(conn, records)

    monkeypatch.setattr(_db, "apply_puts", apply_puts)
    async with open_job_manager(config(tmp_path)) as manager:
        old = await manager.start([b"echo", b"old"], "alice")
        await manager.wait(old.id)
        status = await manager.start([b"sh", b"-c", b"echo hi; exec sleep 1000"], "alice")
        await wait_for_output(manager, status.id, b"hi\n")
        full[0] = True  # the disk fills up: the end record cannot be written
        with pytest.raises(EngineError, match="its end cannot be recorded yet"):
            await manager.stop(status.id)
        assert manager.status(status.id).state is JobState.RUNNING
        assert [s.state for s in manager.list()] == [JobState.EXITED, JobState.RUNNING]
        with pytest.raises(InvalidState):
            await manager.delete(status.id)
        await manager.delete(old.id)  # a delete needs no put
        full[0] = False  # space is back: the retry writes the end
        with trio.fail_after(TIMEOUT):
            final = await manager.wait(status.id)
        assert final.describe() == "stopped"
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.list() == [final]
        assert (await manager.start([b"true"], "alice")).id == status.id + 1


@pytest.mark.parametrize("tracking", ["auto", "gate"])
async def test_a_start_whose_record_cannot_be_written_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking: str) -> None:
    """No acknowledgement from memory: the start is refused, its process killed, and
    no ID a client was given ever comes back. (Acknowledged starts used to vanish in
    a crash on a full disk, and their IDs were handed out again.)"""
    full = [False]
    real_puts = _db.apply_puts

    def apply_puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
        if full[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real_puts(conn, records)

    monkeypatch.setattr(_db, "apply_puts", apply_puts)
    marker = tmp_path / "ran"
    async with open_job_manager(config(tmp_path, tracking=tracking)) as manager:
        first = await manager.start([b"true"], "alice")
        full[0] = True
        for argv in ([b"sh", b"-c", b'sleep 1; touch "$0"', os.fsencode(marker)],
                     [b"nosuchcommand"]):
            with pytest.raises(EngineError, match="job not started: its record cannot be "
                                                  "written: job database: database or disk "
                                                  "is full"):
                await manager.start(argv, "alice")
        assert [s.id for s in manager.list()] == [first.id]
        full[0] = False
        second = await manager.start([b"true"], "alice")
        await manager.wait(second.id)
    assert second.id > first.id
    assert not marker.exists()  # killed, never supervised, never acknowledged
    async with open_job_manager(config(tmp_path)) as manager:
        assert [s.id for s in manager.list()] == [first.id, second.id]


def test_a_full_disk_is_reported_as_full_not_as_a_failed_rollback(tmp_path: Path) -> None:
    """SQLite rolls back by itself on SQLITE_FULL; our ROLLBACK must not replace the
    error with "cannot rollback - no transaction is active" (EIO)."""
    db = JobDB.open(tmp_path / "state")
    try:
        class Full(sqlite3.OperationalError):
            sqlite_errorcode = sqlite3.SQLITE_FULL

        conn = _db.connect(db.path)
        try:
            op = _db._Op("put", record=Record(JobStatus(
                id=1, owner="a", argv=(b"x",), state=JobState.RUNNING, created=1.0)))

            def fail(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
                conn.execute("ROLLBACK")  # what SQLite does by itself on a full disk
                raise Full("database or disk is full")

            real = _db._puts
            _db._puts = fail  # type: ignore[assignment]
            try:
                db._apply(conn, [op])
            finally:
                _db._puts = real  # type: ignore[assignment]
        finally:
            conn.close()
        assert op.error is not None
        assert op.error.errno == errno.ENOSPC
        assert str(op.error) == "[Errno 28] job database: database or disk is full"
    finally:
        db.close()


async def test_a_stale_running_record_is_lost_and_its_processes_are_killed(
        tmp_path: Path, spawned: Spawner) -> None:
    # A job of a previous jobd: a shell (group and session leader) and its child.
    proc = await spawned("sh", "-c", "sleep 1000 & echo $!; wait")
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(TIMEOUT):
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive_some()
    child = int(line)
    child_start = start_ticks(child)
    stale_record(tmp_path, 7, proc.pid, start_ticks(proc.pid))
    events = Events()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        status = manager.status(7)
        assert status.state is JobState.ERROR and status.error == LOST
        assert status.describe() == "error: lost: jobd stopped while the job ran"
        assert events.seen == [("lost", 7, status.describe())]
        assert not alive(child, child_start)
        assert (await manager.start([b"true"], "alice")).id == 8
    with trio.fail_after(TIMEOUT):
        assert await proc.wait() == -signal.SIGKILL
    events.seen.clear()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        assert manager.status(7).error == LOST  # recorded: no second "lost"
    assert events.seen == []


@pytest.mark.parametrize("skew", [-1, 1000])
async def test_a_recycled_pid_is_not_killed(tmp_path: Path, skew: int,
                                            spawned: Spawner) -> None:
    proc = await spawned("sleep", "1000")
    start = start_ticks(proc.pid)
    stale_record(tmp_path, 1, proc.pid, start + skew)  # same pid, another process
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(1).error == LOST
    assert alive(proc.pid, start)


async def test_a_record_from_another_boot_kills_nothing(
        tmp_path: Path, spawned: Spawner) -> None:
    proc = await spawned("sleep", "1000")
    start = start_ticks(proc.pid)
    stale_record(tmp_path, 1, proc.pid, start, boot="another-boot")
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(1).error == LOST
    assert alive(proc.pid, start)


async def test_a_lost_job_keeps_its_whole_output(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"sh", b"-c", b"echo kept; exec sleep 1000"], "alice")
        await wait_for_output(manager, status.id, b"kept\n")
        log_path = log_file(tmp_path, status.id)
        saved = log_path.read_bytes()
        await manager.stop(status.id)
    # Pretend jobd died mid-job: the running record, the log with a torn last record.
    stale_record(tmp_path, status.id, 1 << 22, 0)
    log_path.write_bytes(saved + saved[:25])
    async with open_job_manager(config(tmp_path)) as manager:
        lost = manager.status(status.id)
        assert lost.error == LOST and lost.output_bytes == len(b"kept\n")
        assert data(await collect(manager.follow_output(status.id))) == b"kept\n"
    assert log_path.read_bytes() == saved


async def test_a_failed_append_is_cut_so_the_next_one_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path / "state")
    store.load()
    now = time.time()
    running = JobStatus(id=7, owner="alice", argv=(b"x",), state=JobState.RUNNING, pid=1,
                        created=now, started=now)
    store.write(Record(running))
    path = store.record_path(7)
    size = path.stat().st_size
    real = os.pwrite

    def torn(fd: int, data: bytes, offset: int) -> int:
        real(fd, data[:5], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", torn)
    ended = dataclasses.replace(running, state=JobState.EXITED, exit_code=0, ended=now + 1)
    with pytest.raises(OSError):
        store.write(Record(ended))
    assert path.stat().st_size == size  # the torn bytes are gone
    monkeypatch.undo()
    store.write(Record(ended))
    assert [r.status for r in store.load()[0]] == [ended]
    store.close()


async def test_gate_tracking_runs_jobs_like_a_direct_spawn(tmp_path: Path) -> None:
    """With tracking "gate" every job starts through the spawn helper, which waits for
    its record: output, exit codes, spawn errors, cwd and stop behave as without it."""
    async with open_job_manager(config(tmp_path, tracking="gate")) as manager:
        layout = manager.cgroup_layout()
        assert (layout["tracking"], layout["tracking_reason"]) == ("gate", "asked for")
        job = await manager.start([b"sh", b"-c", b"pwd; echo err >&2; exit 3"], "alice",
                                  cwd=os.fsencode(tmp_path), env={b"PATH": b"/usr/bin:/bin"})
        assert job.pid is not None
        with trio.fail_after(TIMEOUT):
            assert (await manager.wait(job.id)).describe() == "exited: 3"
        chunks = await collect(manager.read_output(job.id))
        assert data(chunks, 1) == os.fsencode(tmp_path) + b"\n" and data(chunks, 2) == b"err\n"
        missing = await manager.start([b"nosuchcommand"], "alice")
        assert missing.describe() == "error: command not found: nosuchcommand"
        assert missing.pid is None
        nodir = await manager.start([b"true"], "alice", cwd=b"/nonexistent-dir")
        assert nodir.describe().startswith("error: cannot change to directory /nonexistent-dir")
        sleeper = await manager.start([b"sleep", b"1000"], "alice")
        with trio.fail_after(TIMEOUT):
            assert (await manager.stop(sleeper.id, grace=0)).describe() == "stopped"
    async with open_job_manager(config(tmp_path)) as manager:  # all of it recorded
        assert [s.describe() for s in manager.list()] == [
            "exited: 3", "error: command not found: nosuchcommand", nodir.describe(),
            "stopped"]
