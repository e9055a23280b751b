"""The job database: durable acknowledgements, group commit, only running jobs in memory."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

import jobctl
from jobd.engine import EngineError, _db, open_job_manager
from jobd.engine._store import Record
from protocol import JobState, JobStatus
from tests.conftest import Pki, start_jobd
from tests.engine_helpers import TIMEOUT, collect, config, data

#: Client threads starting jobs at once in the crash test.
CLIENTS = 6
#: Acknowledged starts to wait for before the kill (spread over several batches).
BEFORE_KILL = 60


def rows(tmp_path: Path) -> dict[int, str]:
    """The rows on disk, read with a connection of our own: {id: state}."""
    conn = sqlite3.connect(tmp_path / "state" / "jobs.db")
    try:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        conn.close()


def test_every_acknowledged_start_survives_kill_9_during_a_batch_of_starts(
        pki: Pki, tmp_path: Path) -> None:
    server = start_jobd(pki, tmp_path / "state")
    acked: list[int] = []
    cond = threading.Condition()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            conn = jobctl.connect_blocking(server.address, server.port, server_name="localhost",
                                           **pki.files("alice"))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            return
        try:
            while True:
                status = conn.start(["true"])
                with cond:
                    acked.append(status.id)
                    cond.notify_all()
        except jobctl.JobctlError:
            return  # the server died under us: expected
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        with cond:
            assert cond.wait_for(lambda: len(acked) >= BEFORE_KILL or errors, TIMEOUT * 6)
        server.proc.kill()  # SIGKILL, mid-batch: the clients are still starting jobs
        server.proc.wait()
    finally:
        for t in threads:
            t.join(TIMEOUT * 6)
        server.stop()
    assert not errors, errors
    told = set(acked)
    assert len(told) == len(acked) >= BEFORE_KILL
    on_disk = rows(tmp_path)
    assert told <= set(on_disk), sorted(told - set(on_disk))
    again = start_jobd(pki, tmp_path / "state")
    try:
        with jobctl.connect_blocking(again.address, again.port, server_name="localhost",
                                     **pki.files("alice")) as conn:
            for job_id in sorted(told):
                assert conn.status(job_id).id == job_id
            assert conn.start(["true"]).id > max(on_disk)
    finally:
        again.stop()


async def test_a_start_is_on_disk_when_it_is_acknowledged(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"sleep", b"1000"], "alice")
        assert rows(tmp_path)[status.id] == "running"
        final = await manager.stop(status.id)
        assert rows(tmp_path)[status.id] == final.state.value == "stopped"


async def test_writes_that_arrive_together_share_one_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    first = [True]
    real = _db.apply_puts

    def apply_puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
        if first[0]:  # hold the writer inside the first commit while the others queue
            first[0] = False
            gate.wait(TIMEOUT)
        real(conn, records)

    monkeypatch.setattr(_db, "apply_puts", apply_puts)
    async with open_job_manager(config(tmp_path)) as manager:
        db = manager._ctx.store
        base = db.commits, db.committed_writes

        def record(job_id: int) -> Record:
            return Record(JobStatus(id=job_id, owner="alice", argv=(b"x",),
                                    state=JobState.EXITED, exit_code=0, created=1.0, ended=2.0))

        async with trio.open_nursery() as nursery:
            for job_id in range(1, 21):
                nursery.start_soon(db.write, record(job_id))
            # Every task has queued its write and waits for its commit; the writer
            # holds the first in its transaction.
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        # At most two commits for twenty writes: whatever the first took, the rest
        # queued while it was held, and the next commit took them all.
        assert db.committed_writes - base[1] == 20 and db.commits - base[0] <= 2
        assert sorted(rows(tmp_path)) == list(range(1, 21))


async def test_only_running_jobs_stay_in_memory(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        ended = [await manager.wait((await manager.start([b"echo", b"x"], "alice")).id)
                 for _ in range(5)]
        running = await manager.start([b"sleep", b"1000"], "alice")
        assert set(manager._ctx.jobs) == {running.id}
        assert [manager.status(s.id) for s in ended] == ended  # read from the database
        assert data(await collect(manager.read_output(ended[0].id))) == b"x\n"
        await manager.delete(ended[0].id)
        assert [s.id for s in manager.list()] == [s.id for s in ended[1:]] + [running.id]
        await manager.stop(running.id)
        assert manager._ctx.jobs == {}
        assert manager.status(running.id).state is JobState.STOPPED


async def test_a_damaged_row_is_an_error_for_its_job_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        good = await manager.wait((await manager.start([b"true"], "alice")).id)
        bad = await manager.wait((await manager.start([b"true"], "alice")).id)
    conn = sqlite3.connect(tmp_path / "state" / "jobs.db")
    with conn:
        conn.execute("UPDATE jobs SET record = x'c1' WHERE id = ?", (bad.id,))
    conn.close()
    async with open_job_manager(config(tmp_path)) as manager:
        with caplog.at_level(logging.WARNING, logger="jobd.engine"):
            assert manager.list() == [good]
            statuses, more, total = await manager.list_page(0, 10, count=True)
        assert (statuses, more, total) == ([good], False, 2)
        assert "skipping an unreadable job record" in caplog.text
        with pytest.raises(EngineError, match=f"job {bad.id}: unreadable record"):
            manager.status(bad.id)
        assert manager.status(good.id) == good


async def test_an_end_is_shown_only_once_it_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, entered = threading.Event(), threading.Event()
    real = _db.apply_puts

    def apply_puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
        records = list(records)
        if any(r.status.state is JobState.EXITED for r in records):
            entered.set()
            gate.wait(TIMEOUT)  # hold the end's commit
        real(conn, records)

    monkeypatch.setattr(_db, "apply_puts", apply_puts)
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"echo", b"bye"], "alice")
        followed: list[bytes] = []

        async def follow() -> None:
            followed.append(data(await collect(manager.follow_output(status.id))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            # The job has ended in memory; its end is being committed, held.
            assert await trio.to_thread.run_sync(entered.wait, TIMEOUT)
            assert not manager._ctx.jobs[status.id].running
            await trio.testing.wait_all_tasks_blocked()
            assert manager.status(status.id).state is JobState.RUNNING
            assert followed == []  # the stream's end waits for the commit too
            assert rows(tmp_path)[status.id] == "running"
            gate.set()
        assert followed == [b"bye\n"]
        assert manager.status(status.id).describe() == "exited: 0"
        assert rows(tmp_path)[status.id] == "exited"
