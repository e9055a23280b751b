"""The one-time import of an older jobd's msgpack records, with the careful recovery
of issue 13.9: a torn last entry is cut and logged, an emptied record is damage (never
a deletion), deletion marks keep IDs retired."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from jobd.engine import LOST, open_job_manager
from jobd.engine._statedir import StateDirError
from jobd.engine._store import MAGIC, Store
from protocol import JobState
from tests.engine_helpers import Events, collect, config, data, legacy_job, log_file


def legacy(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


async def test_a_legacy_state_directory_is_imported_once_and_said_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with legacy(tmp_path) as store:
        ok = legacy_job(store, 1, b"hi\n")
        other = legacy_job(store, 2, owner="bob")
        legacy_job(store, 3)
        store.delete(3, keep_id=True)  # the highest ID, deleted: it stays retired
    state = tmp_path / "state"
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path)) as manager:
            assert manager.list() == [ok, other]
            assert data(await collect(manager.read_output(ok.id))) == b"hi\n"
            assert (await manager.start([b"true"], "alice")).id == 4
    assert "migration: imported 2 job records (highest ID 3)" in caplog.text
    assert "migration: moved 1 output logs into shard directories" in caplog.text
    assert not (state / "jobs").exists() and (state / "jobs.migrated" / "1.msgpack").exists()
    assert log_file(tmp_path, 1).exists() and not (state / "logs" / "1.log").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path)) as manager:
            assert [s.id for s in manager.list()] == [1, 2, 4]
    assert "migration" not in caplog.text


async def test_a_crash_after_the_import_finishes_the_move_on_the_next_start(
        tmp_path: Path) -> None:
    with legacy(tmp_path) as store:
        ok = legacy_job(store, 1, b"hi\n")
    async with open_job_manager(config(tmp_path)):
        pass
    state = tmp_path / "state"
    # As if the import committed and jobd died before it moved the logs and records.
    os.rename(state / "jobs.migrated", state / "jobs")
    os.rename(log_file(tmp_path, 1), state / "logs" / "1.log")
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.list() == [ok]  # not imported twice
        assert data(await collect(manager.read_output(ok.id))) == b"hi\n"
    assert (state / "jobs.migrated").is_dir() and not (state / "jobs").exists()


async def test_damage_and_leftovers_in_a_legacy_directory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with legacy(tmp_path) as store:
        ok = legacy_job(store, 1, b"hi\n")
        legacy_job(store, 2, b"lost?\n")
    state = tmp_path / "state"
    jobs = state / "jobs"
    (jobs / "1.msgpack.tmp").write_bytes(b"half a rec")  # a crash mid-write
    (jobs / "3.msgpack").write_bytes(b"\xc1garbage")
    os.truncate(jobs / "2.msgpack", 0)  # what a crash could leave: not a deletion
    (state / "logs" / "99.log").write_bytes(b"")  # a start a crash cut short
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path)) as manager:
            assert manager.list() == [ok]
            assert (await manager.start([b"true"], "alice")).id == 4
    assert "job 2: unreadable record" in caplog.text and "the record file is empty" in caplog.text
    assert "job 3: unreadable record" in caplog.text
    kept = state / "jobs.migrated"
    assert not (kept / "1.msgpack.tmp").exists() and (kept / "2.msgpack").exists()
    assert log_file(tmp_path, 2).read_bytes()  # kept for whoever investigates
    assert not log_file(tmp_path, 99).exists()


async def test_a_torn_end_entry_is_cut_the_job_lost_once_and_the_recovery_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with legacy(tmp_path) as store:
        legacy_job(store, 1, b"one\n")
    path = tmp_path / "state" / "jobs" / "1.msgpack"
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    path.write_bytes(raw[:-3])  # a crash inside the end entry
    events = Events()
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path, on_event=events)) as manager:
            lost = manager.status(1)
            assert data(await collect(manager.read_output(1))) == b"one\n"
    assert lost.state is JobState.ERROR and lost.error == LOST
    assert "job 1: its record was cut inside its last entry" in caplog.text
    assert "recovered the entry before it (state running)" in caplog.text
    assert [kind for kind, _, _ in events.seen] == ["lost"]
    assert (path.parent.with_name("jobs.migrated") / "1.msgpack").stat().st_size < len(raw) - 3
    events = Events()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        assert manager.status(1) == lost
    assert events.seen == []  # lost once, not at every start


async def test_a_legacy_jobs_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "jobs").symlink_to(elsewhere)
    with pytest.raises(StateDirError, match=r"cannot open jobs/ \(a symlink"):
        async with open_job_manager(config(tmp_path)):
            pass
    assert (state / "jobs").is_symlink() and not (state / "jobs.migrated").exists()
