"""What a running job holds while it waits (issue 26 item 4: RSS per running job).

An idle job is what jobd keeps most of (1,000 `sleep` jobs is the benchmark),
so what each one holds is fixed here in shape: one task waits on both of its
pipes, its log has no writer's lock until it writes, its cgroup object keeps
no copies of its paths. The bytes are measured in bench/ (figure 6); these
tests only catch a second pump task or a per-job object coming back.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio

from jobd.engine import JobManager
from protocol import JobState
from tests.engine_helpers import TIMEOUT, collect, data, manager

__all__ = ["manager"]  # the fixture

JOBS = 3


def _tasks() -> Iterator[trio.lowlevel.Task]:
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


async def test_an_idle_job_waits_with_one_pump_task_for_both_pipes(
        manager: JobManager) -> None:
    ids = [(await manager.start([b"sleep", b"600"], "alice")).id for _ in range(JOBS)]
    try:
        pumps = [t for t in _tasks() if t.name.endswith("Job._pump")]
        assert len(pumps) == JOBS  # not one per pipe
        for job_id in ids:
            job = manager._ctx.jobs[job_id]
            assert job.log._cond is None  # the writer's lock comes with the first output
            assert job.log._tail is None  # the tail in memory comes with followers
            if job._cgroup is not None:  # measured (cgroups writable): no per-job dict
                assert not hasattr(job._cgroup, "__dict__")
    finally:
        for job_id in ids:
            await manager.stop(job_id, grace=0)
        with trio.fail_after(TIMEOUT):
            for job_id in ids:
                assert (await manager.wait(job_id)).state is JobState.STOPPED


async def test_one_pipe_ending_early_leaves_the_other_read(manager: JobManager) -> None:
    # stdout closes first, then stderr keeps writing; and the other way round.
    for closed, late, fd in ((b">&-", b"late >&2", 2), (b"2>&-", b"late", 1)):
        script = b"exec " + closed + b"; sleep 0.2; echo " + late + b"; echo more >&" + \
            str(fd).encode()
        status = await manager.start([b"sh", b"-c", script], "alice")
        with trio.fail_after(TIMEOUT):
            final = await manager.wait(status.id)
        assert final.describe() == "exited: 0"
        chunks = await collect(manager.read_output(status.id))
        assert data(chunks, fd) == b"late\nmore\n"
        assert data(chunks, 3 - fd) == b""


async def test_both_pipes_busy_at_once_lose_nothing(manager: JobManager) -> None:
    # Both pipes full at once: one task takes turns between them, each whole.
    script = (b"head -c 3000000 /dev/zero | tr '\\0' o & "
              b"head -c 2000000 /dev/zero | tr '\\0' e >&2; wait")
    status = await manager.start([b"sh", b"-c", script], "alice")
    with trio.fail_after(TIMEOUT):
        final = await manager.wait(status.id)
    assert final.describe() == "exited: 0"
    chunks = await collect(manager.read_output(status.id))
    assert data(chunks, 1) == b"o" * 3_000_000
    assert data(chunks, 2) == b"e" * 2_000_000
