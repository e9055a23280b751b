"""The state directory: one jobd at a time, who may write it, symlinks, crash recovery."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from jobd.engine import LOST, open_job_manager
from jobd.engine._statedir import StateDirError
from protocol import JobState
from tests.conftest import JOBD, RUN_CWD, Pki, start_jobd
from tests.engine_helpers import Events, config


def jobd_cmd(pki: Pki, state_dir: Path) -> list[str]:
    return [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
            "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0",
            "--state-dir", str(state_dir)]


def refused(pki: Pki, state_dir: Path) -> str:
    """Start jobd on ``state_dir``; it must exit 1 with one line: that line."""
    result = subprocess.run(jobd_cmd(pki, state_dir), capture_output=True, timeout=60,
                            cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "startup-failed" in lines[0], lines
    return lines[0]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (ns): to see that nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


# -- 13.7: one jobd per state directory ----------------------------------------


def test_a_second_jobd_on_the_same_state_directory_refuses_and_touches_nothing(
        pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_jobd(pki, state)
    try:
        result = first.jobctl("alice", "start", "--", "sleep", "1000")
        assert result.returncode == 0, result.stderr
        job = result.stdout.decode().split()[-1]
        before = tree(state)
        line = refused(pki, state)
        assert f"state directory {state} is in use by jobd pid {first.proc.pid}" in line
        assert tree(state) == before
        status = first.jobctl("alice", "status", job)
        assert status.returncode == 0 and b"running" in status.stdout, status
        assert first.jobctl("alice", "stop", job).returncode == 0
    finally:
        assert first.stop() == 0
    # Once the first is gone the directory is free again.
    second = start_jobd(pki, state)
    second.stop()


# -- 13.8: who may write the state directory, and symlinks ----------------------


def test_a_group_writable_state_directory_is_refused_with_the_fix(
        pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o770)
    line = refused(pki, state)
    assert "writable by group or others (mode 0770)" in line
    assert f"run chmod go-w {state}" in line
    assert list(state.iterdir()) == []  # not even a lock file


async def test_unsafe_state_directories_are_refused(tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o777)
    with pytest.raises(StateDirError, match="writable by group or others"):
        async with open_job_manager(config(tmp_path, state_dir=world)):
            pass
    public = tmp_path / "public"  # a parent anyone may write into, not sticky
    public.mkdir()
    public.chmod(0o777)
    with pytest.raises(StateDirError, match=f"its parent {public} is writable .* sticky"):
        async with open_job_manager(config(tmp_path, state_dir=public / "state")):
            pass
    sticky = tmp_path / "sticky"  # like /tmp: fine, when the state directory is jobd's
    sticky.mkdir()
    sticky.chmod(0o1777)
    async with open_job_manager(config(tmp_path, state_dir=sticky / "state")):
        pass
    if os.geteuid() == 0:  # only root can give a directory away
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(StateDirError, match="owned by uid 65534, not by jobd's user"):
            async with open_job_manager(config(tmp_path, state_dir=theirs)):
                pass
    jobs_link = tmp_path / "linked"
    jobs_link.mkdir(mode=0o700)
    (jobs_link / "jobs").symlink_to(tmp_path / "world")
    with pytest.raises(StateDirError, match="cannot open jobs/ \\(a symlink, or not a dir"):
        async with open_job_manager(config(tmp_path, state_dir=jobs_link)):
            pass


async def test_the_state_directory_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    async with open_job_manager(config(tmp_path, state_dir=state)):
        pass
    for d in (state, state / "jobs", state / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, d
    assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600


async def test_a_symlink_in_the_state_directory_is_never_followed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    state = tmp_path / "state"
    async with open_job_manager(config(tmp_path)) as manager:
        first = await manager.wait((await manager.start([b"true"], "alice")).id)
        # Someone who could write there plants links for the next jobs' files.
        (state / "logs" / f"{first.id + 1}.log").symlink_to(victim)
        (state / "jobs" / f"{first.id + 2}.msgpack.tmp").symlink_to(victim)
        with caplog.at_level(logging.WARNING, logger="jobd.engine"):
            linked = await manager.wait((await manager.start(
                [b"echo", b"overwritten"], "alice")).id)
        assert linked.state is JobState.EXITED and linked.output_bytes == 0
        assert linked.dropped_bytes == len(b"overwritten\n")
        assert f"logs/{linked.id}.log: the log file is a symlink (not followed)" in caplog.text
        other = await manager.wait((await manager.start([b"echo", b"fine"], "alice")).id)
        assert other.id == first.id + 2 and other.output_bytes == len(b"fine\n")
    assert victim.read_bytes() == b"precious\n"
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(other.id) == other
    assert victim.read_bytes() == b"precious\n"


# -- 13.9: recovery ------------------------------------------------------------


async def test_an_emptied_record_is_damage_not_a_deletion(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        job = await manager.wait((await manager.start([b"echo", b"keep"], "alice")).id)
    jobs, logs = tmp_path / "state" / "jobs", tmp_path / "state" / "logs"
    os.truncate(jobs / f"{job.id}.msgpack", 0)  # what a crash could leave
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path)) as manager:
            assert manager.list() == []
            assert (await manager.start([b"true"], "alice")).id == job.id + 1
    assert f"job {job.id}: unreadable record" in caplog.text
    assert "the record file is empty" in caplog.text
    assert (logs / f"{job.id}.log").read_bytes()  # kept for whoever investigates
    assert (jobs / f"{job.id}.msgpack").exists()


async def test_a_torn_last_entry_is_cut_and_the_recovery_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        job = await manager.wait((await manager.start([b"echo", b"one"], "alice")).id)
    path = tmp_path / "state" / "jobs" / f"{job.id}.msgpack"
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])  # a crash inside the end entry
    events = Events()
    with caplog.at_level(logging.WARNING, logger="jobd.engine"):
        async with open_job_manager(config(tmp_path, on_event=events)) as manager:
            lost = manager.status(job.id)
    assert lost.state is JobState.ERROR and lost.error == LOST
    assert f"job {job.id}: its record was cut inside its last entry" in caplog.text
    assert "recovered the entry before it (state running)" in caplog.text
    assert [kind for kind, _, _ in events.seen] == ["lost"]
    # The torn bytes are gone, so the "lost" entry written at recovery is what
    # the next start reads: the job is not lost a second time.
    events = Events()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        assert manager.status(job.id) == lost
    assert events.seen == []


async def test_deletion_is_explicit_and_survives_a_restart(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        a = await manager.wait((await manager.start([b"true"], "alice")).id)
        b = await manager.wait((await manager.start([b"true"], "alice")).id)
        await manager.delete(b.id)
    jobs = tmp_path / "state" / "jobs"
    assert sorted(p.name for p in jobs.iterdir()) == [f"{a.id}.msgpack", f"{b.id}.deleted"]
    async with open_job_manager(config(tmp_path)) as manager:
        assert [s.id for s in manager.list()] == [a.id]
        c = await manager.start([b"true"], "alice")
        assert c.id == b.id + 1
        await manager.wait(c.id)
    async with open_job_manager(config(tmp_path)) as manager:
        assert [s.id for s in manager.list()] == [a.id, c.id]
    assert not (jobs / f"{b.id}.deleted").exists()  # a higher ID made it unnecessary
