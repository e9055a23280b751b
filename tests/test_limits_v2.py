"""The cgroup v2 code path, against a cgroup2 hierarchy mounted in a temporary directory.

The machines this runs on keep the controllers in v1 and mount v2 without
them (a hybrid layout), so jobd picks v1 by itself. Mounting cgroup2 again and
passing a directory of it as ``cgroup_root`` (``--cgroup-root``) drives the v2
code: placement, ``cgroup.kill``, the ``populated`` events, leftovers. Limit
files are checked where the hierarchy has the controllers; where it has not,
the refusal is.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from jobd.engine import EngineError, JobManager, open_job_manager
from jobd.engine._cgroup_layout import _Mount, _unescape
from jobd.engine._manager import _instance_key
from protocol import JobState, Limits
from tests.engine_helpers import (
    TIMEOUT,
    alive,
    config,
    escapee_then_exit,
    start_ticks,
    wait_for_output,
)
from tests.limits_helpers import v2_cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting cgroup2 needs root")


def _remove_tree(path: Path) -> None:
    """Kill what is in a cgroup tree and remove it, deepest first (test cleanup)."""
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _empty(sub)
        sub.rmdir()
    _empty(path)
    path.rmdir()


def _empty(cgroup: Path) -> None:
    (cgroup / "cgroup.kill").write_text("1")
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            pidfd = os.pidfd_open(int(pid))
        except ProcessLookupError:
            continue
        try:
            select.select([pidfd], [], [], TIMEOUT)  # readable once it has exited
        finally:
            os.close(pidfd)


@pytest.fixture
def v2_root(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "cgroup2"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "cgroup2", "none", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount cgroup2 (the kernel lacks it?): {result.stderr.strip()}")
    base = mountpoint / f"jobd-test-{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir()
        yield base
    finally:
        try:
            if base.exists():
                _remove_tree(base)
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.fixture
async def manager(tmp_path: Path, v2_root: Path) -> AsyncIterator[JobManager]:
    async with open_job_manager(config(tmp_path, cgroup_root=v2_root)) as m:
        yield m


#: A process that leaves the job's session; it prints its pid once it has.
ESCAPE = b"setsid sh -c 'echo $$; exec sleep 1000' & "


def jobs_parent(tmp_path: Path, v2_root: Path) -> Path:
    return v2_root / f"jobd-{_instance_key(tmp_path / 'state')}"


def owner_group(tmp_path: Path, v2_root: Path, owner: str) -> Path:
    return jobs_parent(tmp_path, v2_root) / ("owner-" + hashlib.sha256(
        owner.encode()).hexdigest()[:16])


def job_cgroup(tmp_path: Path, v2_root: Path, owner: str, job_id: int) -> Path:
    """With v2 a job's cgroup is in its owner's group (issue 22 item 11)."""
    return owner_group(tmp_path, v2_root, owner) / f"job-{job_id}"


async def test_v2_layout_is_reported(manager: JobManager, tmp_path: Path,
                                     v2_root: Path) -> None:
    layout = manager.cgroup_layout()
    assert layout["mode"] == "v2"
    assert layout["root"] == str(jobs_parent(tmp_path, v2_root))
    offered = set((v2_root / "cgroup.controllers").read_text().split())
    expected = sorted(offered & {"memory", "cpu", "io", "pids"})
    assert layout["controllers"] == (",".join(expected) or "none")


async def test_v2_placement_kill_and_removal(manager: JobManager, tmp_path: Path,
                                             v2_root: Path) -> None:
    # Isolation alone gives a job its cgroup (a v2 subtree without controllers still
    # tracks and kills every process of the job).
    job = await manager.start([b"sh", b"-c", ESCAPE + b"exec sleep 1000"], "alice",
                              limits=Limits(isolate=("mount",)))
    assert job.pid is not None
    escapee = int(await wait_for_output(manager, job.id, b"\n"))
    start = start_ticks(escapee)
    cgroup = job_cgroup(tmp_path, v2_root, "alice", job.id)
    relative = "/" + str(cgroup.relative_to(v2_root.parent))
    # Both are in the job's cgroup: the main process was placed before it ran.
    assert v2_cgroup(job.pid).endswith(relative)
    assert v2_cgroup(escapee).endswith(relative)
    assert {job.pid, escapee} <= {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
    with trio.fail_after(TIMEOUT):
        final = await manager.stop(job.id)
    assert final.state is JobState.STOPPED
    assert not alive(escapee, start)  # cgroup.kill reached the setsid escapee
    assert not cgroup.exists()


async def test_v2_job_end_waits_for_the_cgroup_to_empty(manager: JobManager, tmp_path: Path,
                                                        v2_root: Path) -> None:
    job = await manager.start(escapee_then_exit(tmp_path), "alice",
                              limits=Limits(isolate=("net",)))
    escapee = int(await wait_for_output(manager, job.id, b"\n"))
    start = start_ticks(escapee)
    with trio.fail_after(TIMEOUT):
        final = await manager.wait(job.id)
    assert final.describe() == "exited: 0"
    assert not alive(escapee, start)
    assert not job_cgroup(tmp_path, v2_root, "alice", job.id).exists()
    assert final.cpu_time is not None  # cpu.stat exists without the cpu controller


async def test_v2_limit_files_or_a_clear_refusal(manager: JobManager, tmp_path: Path,
                                                 v2_root: Path) -> None:
    offered = set((v2_root / "cgroup.controllers").read_text().split())
    for resource, limits, file, value in (
            ("memory", Limits(memory=64 << 20), "memory.max", "67108864"),
            ("pids", Limits(pids=20), "pids.max", "20"),
            ("cpu", Limits(cpus=0.5), "cpu.max", "50000 100000")):
        if resource in offered:
            job = await manager.start([b"sleep", b"1000"], "alice", limits=limits)
            cgroup = job_cgroup(tmp_path, v2_root, "alice", job.id)
            assert (cgroup / file).read_text().strip() == value
            await manager.stop(job.id, grace=0)
        else:
            with pytest.raises(EngineError, match=f"cannot enforce --.*: no {resource} "
                               f"controller in the cgroup v2 subtree"):
                await manager.start([b"true"], "alice", limits=limits)


async def test_v2_leftovers_are_killed_and_removed(tmp_path: Path, v2_root: Path) -> None:
    leftover = jobs_parent(tmp_path, v2_root) / "job-77"  # as a jobd that died left it
    leftover.mkdir(parents=True)
    sleeper = await trio.lowlevel.open_process(["sleep", "1000"], start_new_session=True)
    try:
        (leftover / "cgroup.procs").write_text(str(sleeper.pid))
        async with open_job_manager(config(tmp_path, cgroup_root=v2_root)):
            with trio.fail_after(TIMEOUT):
                assert await sleeper.wait() == -9
            assert not leftover.exists()
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_v2_each_owners_jobs_are_in_its_group(manager: JobManager, tmp_path: Path,
                                                    v2_root: Path) -> None:
    """Jobs without limits too: each job's (measuring) cgroup is in its owner's group,
    all of one owner's in one, jobd outside them all. Real cgroup2, mounted here
    without the cpu controller (this machine keeps it in v1): placement, not weight."""
    jobs = {name: await manager.start([b"sleep", b"1000"], who)
            for name, who in (("a1", "alice"), ("a2", "alice"), ("b", "bob"))}
    where = {name: v2_cgroup(job.pid) for name, job in jobs.items() if job.pid is not None}
    top = v2_root.parent
    for name, who in (("a1", "alice"), ("a2", "alice"), ("b", "bob")):
        expected = job_cgroup(tmp_path, v2_root, who, jobs[name].id)
        assert where[name] == "/" + str(expected.relative_to(top)), where
    assert "/owner-" not in v2_cgroup(os.getpid())  # jobd (this process) is outside them
    assert manager.cgroup_layout()["owners"] == str(jobs_parent(tmp_path, v2_root))
    with trio.fail_after(TIMEOUT):
        for job in jobs.values():
            assert (await manager.stop(job.id, grace=0)).state is JobState.STOPPED
    for name, who in (("a1", "alice"), ("b", "bob")):
        assert not job_cgroup(tmp_path, v2_root, who, jobs[name].id).exists()


async def test_v2_owner_groups_go_at_shutdown(tmp_path: Path, v2_root: Path) -> None:
    async with open_job_manager(config(tmp_path, cgroup_root=v2_root)) as manager:
        job = await manager.start([b"true"], "alice")
        with trio.fail_after(TIMEOUT):
            await manager.wait(job.id)
        assert owner_group(tmp_path, v2_root, "alice").is_dir()
    assert not jobs_parent(tmp_path, v2_root).exists()


async def test_v2_leftovers_in_owner_groups_are_killed_and_removed(tmp_path: Path,
                                                                  v2_root: Path) -> None:
    group = owner_group(tmp_path, v2_root, "alice")
    leftover = group / "job-78"  # as a jobd that died left it
    leftover.mkdir(parents=True)
    sleeper = await trio.lowlevel.open_process(["sleep", "1000"], start_new_session=True)
    try:
        (leftover / "cgroup.procs").write_text(str(sleeper.pid))
        async with open_job_manager(config(tmp_path, cgroup_root=v2_root)):
            with trio.fail_after(TIMEOUT):
                assert await sleeper.wait() == -9
            assert not leftover.exists() and not group.exists()
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_a_bad_cgroup_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a cgroup v2 directory"):
        async with open_job_manager(config(tmp_path, cgroup_root=tmp_path)):
            pass


def test_mount_paths() -> None:
    """/proc/self/mountinfo escapes and mounts that show a sub-tree of a hierarchy."""
    assert _unescape("/sys/fs/cgroup/my\\040dir") == "/sys/fs/cgroup/my dir"
    whole = _Mount("/sys/fs/cgroup", "/")
    assert whole.dir_of("/") == "/sys/fs/cgroup"
    assert whole.dir_of("/system.slice/jobd.service") == "/sys/fs/cgroup/system.slice/jobd.service"
    part = _Mount("/mnt/cg", "/system.slice")
    assert part.dir_of("/system.slice/jobd.service") == "/mnt/cg/jobd.service"
    assert part.dir_of("/system.slice") == "/mnt/cg"
    assert part.dir_of("/user.slice") is None
    assert part.dir_of("/system.slice2") is None
