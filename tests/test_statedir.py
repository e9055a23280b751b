"""The state directory: one jobd at a time, who may write it, symlinks, crash recovery."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from jobd.engine import open_job_manager
from jobd.engine._statedir import StateDirError
from protocol import JobState
from tests.conftest import JOBD, RUN_CWD, Pki, start_jobd
from tests.engine_helpers import config


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
    async with open_job_manager(config(tmp_path, state_dir=state)) as manager:
        await manager.wait((await manager.start([b"echo", b"hi"], "alice")).id)
        for name in ("jobs.db-wal", "jobs.db-shm"):  # they hold rows too
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    for d in (state, state / "logs", state / "logs" / "0"):
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, d
    for f in (state / "lock", state / "jobs.db", state / "logs" / "0" / "1.log"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_a_symlink_in_the_state_directory_is_never_followed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    state = tmp_path / "state"
    async with open_job_manager(config(tmp_path)) as manager:
        first = await manager.wait((await manager.start([b"echo", b"first"], "alice")).id)
        # Someone who could write there plants a link for the next job's log.
        (state / "logs" / "0" / f"{first.id + 1}.log").symlink_to(victim)
        with caplog.at_level(logging.WARNING, logger="jobd.engine"):
            linked = await manager.wait((await manager.start(
                [b"echo", b"overwritten"], "alice")).id)
        assert linked.state is JobState.EXITED and linked.output_bytes == 0
        assert linked.dropped_bytes == len(b"overwritten\n")
        assert f"/{linked.id}.log: the log file is a symlink (not followed)" in caplog.text
        other = await manager.wait((await manager.start([b"echo", b"fine"], "alice")).id)
        assert other.output_bytes == len(b"fine\n")
    assert victim.read_bytes() == b"precious\n"
    # The database is opened by path (SQLite has no O_NOFOLLOW): links are refused first.
    os.rename(state / "jobs.db", tmp_path / "jobs.db")
    (state / "jobs.db").symlink_to(tmp_path / "jobs.db")
    with pytest.raises(StateDirError, match=r"jobs\.db is not a regular file"):
        async with open_job_manager(config(tmp_path)):
            pass
