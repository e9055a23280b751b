"""A start whose caller is cancelled mid-spawn still leaves a supervised job
(found by the robustness work; fixed by shielding the spawn in JobManager.start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from jobd.engine import EngineConfig, open_job_manager


@pytest.mark.timeout(15, method="signal")  # the bug hung in the shielded shutdown
async def test_a_cancelled_start_leaves_no_unsupervised_job(tmp_path: Path) -> None:
    """JobManager.start() whose caller is cancelled while the job is being spawned (a
    client's request cancelled by jobd, e.g. on a protocol error): trio's started() then
    "quietly quits" and leaves the job task in the caller's cancelled nursery instead of
    moving it to the job nursery, so its supervision is cancelled at once. The job stays
    "running" forever, its process is never reaped, and jobd's shutdown waits for it
    forever. Shielding the ``self._nursery.start(...)`` call in JobManager.start (spawn
    and the first record write are bounded) would make a start all or nothing."""
    state = tmp_path / "state"
    with trio.fail_after(20):
        async with open_job_manager(EngineConfig(state_dir=state, stop_grace=0.5)) as manager:
            with trio.CancelScope() as scope:
                scope.cancel()  # the caller is already cancelled when the spawn happens
                await manager.start([b"true"], "alice")
            for status in manager.list():
                ended = await manager.wait(status.id)  # hangs today: nobody supervises it
                assert ended.describe() == "exited: 0"
        # ... and the manager's shutdown (on leaving the block) does not hang either
