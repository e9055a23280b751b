"""Job engine: starting, states, the stop sequence, delete, shutdown (real processes)."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from jobd.engine import (
    EngineError,
    InvalidState,
    JobManager,
    JobNotFound,
    open_job_manager,
)
from protocol import JobState, Limits
from tests.engine_helpers import (
    GRACE,
    TIMEOUT,
    Events,
    alive,
    collect,
    config,
    data,
    manager,
    start_ticks,
    stat_fields,
    wait_for_output,
)

__all__ = ["manager"]  # the fixture

TRAP = b"trap '' INT TERM; echo ready; exec sleep 1000"  # ignores SIGINT and SIGTERM


async def test_ids_start_at_1_in_order_and_list_is_ordered(manager: JobManager) -> None:
    ids = [(await manager.start([b"true"], "alice")).id for _ in range(3)]
    assert ids == [1, 2, 3]
    for i in ids:
        await manager.wait(i)
    assert [s.id for s in manager.list()] == [1, 2, 3]


async def test_running_status_has_pid_owner_argv_times(manager: JobManager) -> None:
    status = await manager.start([b"sleep", b"1000"], "alice")
    assert status.state is JobState.RUNNING and status.running
    assert status.pid is not None and status.pid > 0
    assert status.owner == "alice" and status.argv == (b"sleep", b"1000")
    assert status.started is not None and status.created <= status.started
    assert status.ended is None
    # A live status adds its cgroup's usage so far (issue 23: every job is measured).
    live = manager.status(status.id)
    assert dataclasses.replace(live, peak_memory=None, cpu_time=None) == status
    final = await manager.stop(status.id)
    assert final.ended is not None and final.ended >= final.started  # type: ignore[operator]


@pytest.mark.parametrize("code", [0, 3, 255])
async def test_exit_codes(manager: JobManager, code: int) -> None:
    status = await manager.start([b"sh", b"-c", b"exit %d" % code], "alice")
    final = await manager.wait(status.id)
    assert final.state is JobState.EXITED
    assert final.exit_code == code
    assert final.describe() == f"exited: {code}"


async def test_killed_by_a_signal_nobody_requested(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"kill -SEGV $$"], "alice")
    final = await manager.wait(status.id)
    assert final.state is JobState.KILLED
    assert final.signal == "SIGSEGV"
    assert final.describe() == "killed: SIGSEGV"


async def test_command_not_found_is_a_record(manager: JobManager) -> None:
    status = await manager.start([b"nosuchcmd", b"x"], "alice")
    assert status.state is JobState.ERROR
    assert status.describe() == "error: command not found: nosuchcmd"
    assert status.pid is None and status.ended is not None
    assert manager.status(status.id) == status
    assert await collect(manager.follow_output(status.id)) == []
    assert (await manager.start([b"true"], "alice")).id == status.id + 1


async def test_permission_denied(manager: JobManager, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    status = await manager.start([os.fsencode(script)], "alice")
    assert status.describe() == f"error: permission denied: {script}"


async def test_exec_format_error(manager: JobManager, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x7fELF garbage, not a program")
    blob.chmod(0o755)
    status = await manager.start([os.fsencode(blob)], "alice")
    assert status.describe() == f"error: not executable: {blob} (exec format error)"


async def test_bad_working_directory(manager: JobManager) -> None:
    status = await manager.start([b"true"], "alice", cwd=b"/nonexistent-dir")
    assert status.state is JobState.ERROR
    assert status.error == "cannot change to directory /nonexistent-dir: No such file or directory"


async def test_malformed_requests_create_no_record(manager: JobManager) -> None:
    with pytest.raises(EngineError, match="cannot enforce --io-read-bps: /dev/nonexistent"):
        await manager.start([b"true"], "alice",
                            limits=Limits(io_read_bps=(("/dev/nonexistent", 1),)))
    with pytest.raises(EngineError, match="empty"):
        await manager.start([], "alice")
    with pytest.raises(EngineError, match="NUL"):
        await manager.start([b"echo", b"a\0b"], "alice")
    assert manager.list() == []
    status = await manager.start([b"true"], "alice", limits=Limits())
    assert status.id == 1


async def test_argv_is_passed_verbatim_as_bytes(manager: JobManager) -> None:
    argv = [b"printf", b"%s|", b"-la", b"a b", b"\xff\xfe", b"", b"$HOME"]
    status = await manager.start(argv, "alice")
    await manager.wait(status.id)
    out = data(await collect(manager.read_output(status.id)))
    assert out == b"-la|a b|\xff\xfe||$HOME|"


async def test_cwd_env_and_stdin(manager: JobManager, tmp_path: Path) -> None:
    env = {b"FOO": b"bar\xff", b"PATH": os.environb[b"PATH"]}
    status = await manager.start([b"sh", b"-c", b'pwd; printf "%s\\n" "$FOO"; cat'], "alice",
                                 cwd=os.fsencode(tmp_path), env=env)
    final = await manager.wait(status.id)
    assert final.describe() == "exited: 0"  # cat read EOF at once: stdin is /dev/null
    out = data(await collect(manager.read_output(status.id)))
    assert out == os.fsencode(tmp_path) + b"\nbar\xff\n"


async def test_job_runs_in_its_own_session_and_group(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"cat /proc/$$/stat"], "alice")
    await manager.wait(status.id)
    raw = data(await collect(manager.read_output(status.id)))
    fields = raw[raw.rfind(b")") + 2:].split()
    assert int(fields[2]) == status.pid  # process group
    assert int(fields[3]) == status.pid  # session


async def test_stop_sends_sigint_first(manager: JobManager) -> None:
    status = await manager.start([b"sleep", b"1000"], "alice")
    final = await manager.stop(status.id)
    assert final.state is JobState.STOPPED
    assert final.signal == "SIGINT"
    assert final.describe() == "stopped"


async def test_stop_escalates_to_sigkill(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", TRAP], "alice")
    await wait_for_output(manager, status.id, b"ready")
    assert status.pid is not None
    start = trio.current_time()
    final = await manager.stop(status.id, grace=GRACE)
    assert trio.current_time() - start >= 2 * GRACE  # SIGINT and SIGTERM were each given time
    assert final.state is JobState.STOPPED and final.signal == "SIGKILL"
    assert stat_fields(status.pid) is None


async def test_grace_zero_kills_at_once(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path, stop_grace=TIMEOUT * 10)) as manager:
        status = await manager.start([b"sh", b"-c", TRAP], "alice")
        await wait_for_output(manager, status.id, b"ready")
        with trio.fail_after(TIMEOUT):
            final = await manager.stop(status.id, grace=0)
        assert final.state is JobState.STOPPED and final.signal == "SIGKILL"


async def test_concurrent_stops_all_succeed(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", TRAP], "alice")
    await wait_for_output(manager, status.id, b"ready")
    results = []

    async def stop() -> None:
        results.append(await manager.stop(status.id))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(stop)
    assert len(results) == 3
    assert all(r.state is JobState.STOPPED and r.signal == "SIGKILL" for r in results)


async def test_a_later_stop_with_grace_zero_hurries_the_sequence(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", TRAP], "alice")
    await wait_for_output(manager, status.id, b"ready")
    results = []

    async def stop(grace: float) -> None:
        results.append(await manager.stop(status.id, grace=grace))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop, 1000.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(stop, 0)
    assert [r.signal for r in results] == ["SIGKILL", "SIGKILL"]


async def test_stop_kills_grandchildren(manager: JobManager) -> None:
    script = b"sleep 1000 & echo $!; sleep 1000 & echo $!; echo ready; wait"
    status = await manager.start([b"sh", b"-c", script], "alice")
    out = await wait_for_output(manager, status.id, b"ready")
    pids = [int(line) for line in out.split()[:2]]
    starts = [start_ticks(pid) for pid in pids]
    assert all(alive(pid, start) for pid, start in zip(pids, starts, strict=True))
    final = await manager.stop(status.id)
    assert final.state is JobState.STOPPED
    # stop returned: no process of the job is left (at most zombies init has yet to reap)
    assert not any(alive(pid, start) for pid, start in zip(pids, starts, strict=True))


async def test_leftover_holding_the_pipe_neither_keeps_output_open_nor_survives(
        manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"sleep 1000 & echo $!"], "alice")
    follower = manager.follow_output(status.id)
    out = await wait_for_output(manager, status.id, b"\n")
    pid = int(out)
    fields = stat_fields(pid)  # None if the cleanup was already faster than us
    with trio.fail_after(TIMEOUT):
        assert data(await collect(follower)) == out  # ends although the sleep held stdout
        final = await manager.wait(status.id)
    assert final.describe() == "exited: 0"  # leftovers were cleaned up; nobody asked to stop
    if fields is not None:
        assert not alive(pid, int(fields[19]))


async def test_closed_stdout_keeps_the_job_and_its_stream(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"exec >&-; echo ready >&2; exec sleep 1000"],
                                 "alice")
    await wait_for_output(manager, status.id, b"ready", fd=2)
    followed: list[bytes] = []

    async def follow() -> None:
        followed.append(data(await collect(manager.follow_output(status.id))))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked(0.05)  # the stdout pump has seen EOF
        assert manager.status(status.id).running
        assert followed == []  # the stream is still open
        final = await manager.stop(status.id)
    assert final.state is JobState.STOPPED
    assert followed == [b"ready\n"]


async def test_stop_after_the_end_is_invalid_state(manager: JobManager) -> None:
    status = await manager.start([b"true"], "alice")
    await manager.wait(status.id)
    with pytest.raises(InvalidState) as info:
        await manager.stop(status.id)
    assert str(info.value) == "process not running: exited: 0"
    assert info.value.status == manager.status(status.id)


async def test_unknown_job(manager: JobManager) -> None:
    with pytest.raises(JobNotFound):
        manager.status(42)
    with pytest.raises(JobNotFound):
        await manager.stop(42)
    with pytest.raises(JobNotFound):
        await manager.delete(42)
    with pytest.raises(JobNotFound):
        manager.read_output(42)
    with pytest.raises(JobNotFound):
        await manager.wait(42)


async def test_delete(manager: JobManager, tmp_path: Path) -> None:
    ended = await manager.start([b"echo", b"hi"], "alice")
    await manager.wait(ended.id)
    running = await manager.start([b"sleep", b"1000"], "alice")
    with pytest.raises(InvalidState) as info:
        await manager.delete(running.id)
    assert info.value.status.running
    files = sorted(p.name for p in (tmp_path / "state").rglob(f"{ended.id}.*"))
    assert files == [f"{ended.id}.log"]  # the record is a row of jobs.db
    await manager.delete(ended.id)
    assert list((tmp_path / "state").rglob(f"{ended.id}.*")) == []
    with pytest.raises(JobNotFound):
        manager.status(ended.id)
    with pytest.raises(JobNotFound):
        await manager.delete(ended.id)
    assert [s.id for s in manager.list()] == [running.id]
    await manager.stop(running.id)


async def test_deleting_the_newest_job_keeps_its_id_retired(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"echo", b"hi"], "alice")
        await manager.wait(status.id)
        await manager.delete(status.id)
        assert not (tmp_path / "state" / "logs" / "0" / f"{status.id}.log").exists()
        assert manager.list() == []
    async with open_job_manager(config(tmp_path)) as manager:
        assert (await manager.start([b"true"], "alice")).id == status.id + 1


async def test_events(tmp_path: Path) -> None:
    events = Events()
    async with open_job_manager(config(tmp_path, on_event=events)) as manager:
        ok = await manager.start([b"true"], "alice")
        await manager.wait(ok.id)
        bad = await manager.start([b"nosuchcmd"], "alice")
    assert events.seen == [("started", ok.id, "running"), ("ended", ok.id, "exited: 0"),
                           ("ended", bad.id, "error: command not found: nosuchcmd")]


async def test_shutdown_stops_every_job_and_records_it(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        plain = await manager.start([b"sleep", b"1000"], "alice")
        stubborn = await manager.start([b"sh", b"-c", TRAP], "alice")
        await wait_for_output(manager, stubborn.id, b"ready")
        starts = {pid: start_ticks(pid) for pid in (plain.pid, stubborn.pid) if pid}
        await manager.shutdown()
        await manager.shutdown()  # idempotent
        assert [s.describe() for s in manager.list()] == ["stopped", "stopped"]
        with pytest.raises(EngineError, match="shutting down"):
            await manager.start([b"true"], "alice")
    assert len(starts) == 2 and not any(alive(pid, start) for pid, start in starts.items())
    async with open_job_manager(config(tmp_path)) as manager:
        assert [s.describe() for s in manager.list()] == ["stopped", "stopped"]


async def test_shutdown_ends_every_follower(tmp_path: Path) -> None:
    results: list[bytes] = []
    async with trio.open_nursery() as nursery, open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"sh", b"-c", b"echo go; exec sleep 1000"], "alice")

        async def follow() -> None:
            results.append(data(await collect(manager.follow_output(status.id))))

        for _ in range(2):
            nursery.start_soon(follow)
        await wait_for_output(manager, status.id, b"go\n")
        # Leaving the block closes the manager first: its shutdown stops the job, and that
        # ends the followers, so the nursery can close.
    assert results == [b"go\n", b"go\n"]
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(status.id).describe() == "stopped"


async def test_cancelling_the_owner_still_shuts_down_cleanly(tmp_path: Path) -> None:
    with trio.move_on_after(TIMEOUT) as scope:
        async with open_job_manager(config(tmp_path)) as manager:
            status = await manager.start([b"sleep", b"1000"], "alice")
            pid = status.pid
            assert pid is not None
            start = start_ticks(pid)
            scope.cancel()
            await trio.sleep_forever()
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(status.id).describe() == "stopped"
    assert pid is not None and not alive(pid, start)


async def test_signal_numbers_without_a_name(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"kill -%d $$" % (signal.SIGRTMIN + 2)],
                                 "alice")
    final = await manager.wait(status.id)
    assert final.describe() == "killed: SIGRTMIN+2"


async def test_a_process_that_left_the_session_cannot_hold_the_output_open(
        manager: JobManager, tmp_path: Path) -> None:
    # setsid: outside the job's group and session (only cgroups, later, will catch it).
    # The main process ends once the stray has printed its pid; the stray holds stdout.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = b"""setsid sh -c 'echo $$; echo >"$0"; exec sleep 1000' "$0" & read x <"$0" """
    status = await manager.start([b"sh", b"-c", script, os.fsencode(fifo)], "alice")
    out = await wait_for_output(manager, status.id, b"\n")
    stray = int(out)
    try:
        with trio.fail_after(TIMEOUT):
            assert data(await collect(manager.follow_output(status.id))) == out
            final = await manager.wait(status.id)
        assert final.describe() == "exited: 0"
    finally:
        os.kill(stray, signal.SIGKILL)
