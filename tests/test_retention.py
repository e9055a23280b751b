"""History: retention by age, count and log space, prune on demand, the per-user quota."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobd.engine import EngineError, open_job_manager
from jobd.engine._db import JobDB
from jobd.engine._store import Record
from protocol import JobState, JobStatus
from tests.conftest import JobdProcess, Pki, start_jobd
from tests.engine_helpers import TIMEOUT, Events, collect, config, data, log_file

DAY = 86400.0


def history(tmp_path: Path, ended_days_ago: list[float], owner: str = "alice") -> None:
    """Finished jobs 1..n written straight into the database (the benchmark's fast path)."""
    now = time.time()
    db = JobDB.open(tmp_path / "state")
    try:
        db.put_now([Record(JobStatus(
            id=i, owner=owner, argv=(b"true",), state=JobState.EXITED, exit_code=0,
            created=now - ago * DAY - 1, started=now - ago * DAY - 1, ended=now - ago * DAY))
            for i, ago in enumerate(ended_days_ago, start=1)])
    finally:
        db.close()


async def test_prune_removes_what_ended_before_the_cutoff(tmp_path: Path) -> None:
    history(tmp_path, [10, 5, 1])
    events = Events()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        running = await manager.start([b"sleep", b"1000"], "alice")
        assert await manager.prune(3 * DAY) == 2
        assert [s.id for s in manager.list()] == [3, running.id]
        assert sorted(job for kind, job, _ in events.seen if kind == "pruned") == [1, 2]
        assert await manager.prune(0) == 1  # everything finished; never a running job
        assert [s.id for s in manager.list()] == [running.id]
        with pytest.raises(EngineError, match="finite"):
            await manager.prune(float("nan"))
        await manager.stop(running.id)
    async with open_job_manager(config(tmp_path)) as manager:
        assert (await manager.start([b"true"], "alice")).id == running.id + 1  # IDs retired


async def test_retain_and_retain_count(tmp_path: Path) -> None:
    history(tmp_path, [40, 20, 9, 8, 7, 6])
    async with open_job_manager(config(tmp_path, retain=30 * DAY, retain_count=3)) as manager:
        await manager.apply_retention()  # also run once at start, in the background
        assert [s.id for s in manager.list()] == [4, 5, 6]


async def test_max_log_space_removes_the_oldest_logs_first(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        ids = [(await manager.wait((await manager.start(
            [b"head", b"-c", b"10000", b"/dev/zero"], "alice")).id)).id for _ in range(3)]
    async with open_job_manager(config(tmp_path, max_log_space=25_000)) as manager:
        await manager.apply_retention()
        assert [s.id for s in manager.list()] == ids[1:]
        assert not log_file(tmp_path, ids[0]).exists()
        assert len(data(await collect(manager.read_output(ids[1])))) == 10_000


async def test_the_per_user_quota_truncates_and_is_given_back(tmp_path: Path) -> None:
    quota = 3000
    async with open_job_manager(config(tmp_path, max_log_space_per_user=quota)) as manager:
        big = await manager.wait((await manager.start(
            [b"head", b"-c", b"5000", b"/dev/zero"], "alice")).id)
        assert 0 < big.output_bytes < quota and big.output_bytes + big.dropped_bytes == 5000
        assert log_file(tmp_path, big.id).stat().st_size <= quota
        full = await manager.wait((await manager.start([b"echo", b"more"], "alice")).id)
        assert (full.output_bytes, full.dropped_bytes) == (0, 5)
        bob = await manager.wait((await manager.start([b"echo", b"bob"], "bob")).id)
        assert (bob.output_bytes, bob.dropped_bytes) == (4, 0)  # a quota per owner
        await manager.delete(big.id)  # its space comes back
        again = await manager.wait((await manager.start([b"echo", b"back"], "alice")).id)
        assert (again.output_bytes, again.dropped_bytes) == (5, 0)
    async with open_job_manager(config(tmp_path, max_log_space_per_user=30)) as manager:
        # Across a restart the quota starts from what the finished jobs hold (25 bytes).
        late = await manager.wait((await manager.start([b"echo", b"late"], "alice")).id)
        assert (late.output_bytes, late.dropped_bytes) == (0, 5)


def test_prune_on_demand_is_for_admins_and_logged(jobd: JobdProcess) -> None:
    for _ in range(2):
        job = jobd.jobctl("alice", "start", "true").stdout.decode().strip()
        assert jobd.jobctl("alice", "stream", job).returncode == 0
    denied = jobd.jobctl("alice", "prune", "--older-than", "0s")
    assert denied.returncode == 1 and b"permission denied" in denied.stderr
    result = jobd.jobctl("root", "prune", "--older-than", "0s")
    assert result.returncode == 0 and result.stdout == b"removed 2 finished jobs\n", result
    jobd.wait_for_log(r"job-pruned id=1 ")
    jobd.wait_for_log(r"pruned who=root older_than=0.0 removed=2")
    assert jobd.jobctl("root", "list").stdout == b""
    bad = jobd.jobctl("root", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and b"not a duration" in bad.stderr


def test_retention_at_start_is_logged(pki: Pki, tmp_path: Path) -> None:
    history(tmp_path, [3, 2, 1])
    server = start_jobd(pki, tmp_path / "state", "--retain-count", "1", "--retain", "30d")
    try:
        server.wait_for_log(r"job-pruned id=1 ", timeout=TIMEOUT)
        server.wait_for_log(r"job-pruned id=2 ", timeout=TIMEOUT)
        listed = server.jobctl("root", "list").stdout.decode().split("\n")
        assert [line.split("\t")[0] for line in listed if line] == ["3"]
    finally:
        server.stop()


def test_pruning_a_job_being_streamed_ends_the_stream_with_its_status(
        jobd: JobdProcess) -> None:
    """The stream has every byte and then the job's final status, not ``not found``
    (the status used to be looked up again after the last byte, and the job was gone)."""
    import jobctl
    import protocol as p

    files = jobd.pki.files("alice")
    with jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                 **files) as c:
        job = c.start(["head", "-c", "8000000", "/dev/zero"]).id
        assert c.wait(job).describe() == "exited: 0"
        received = 0
        end = None
        with jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                     **jobd.pki.files("root")) as admin:
            for event in c.stream(job):
                if isinstance(event, p.OutputChunk):
                    if received == 0:  # the first chunk is here; the rest is to come
                        assert admin.prune(0) == 1
                    received += len(event.data)
                else:
                    end = event
        assert received == 8000000
        assert end is not None and end.status.describe() == "exited: 0"
        assert end.status.id == job
    jobd.wait_for_log(rf"job-pruned id={job} ")
