"""Per-job limits and isolation in the engine, on this machine's cgroups (SPEC §8).

These run real jobs in real cgroups and namespaces and need root. On the CI
machines (cgroup v1 controllers plus a v2 mount without controllers) nothing
skips; a test skips only where the kernel lacks what it tests, and says what.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from jobd.engine import EngineError, JobManager, LimitExceeded, LimitPolicy, open_job_manager
from protocol import JobState, Limits
from tests.engine_helpers import (
    GRACE,
    TIMEOUT,
    alive,
    collect,
    config,
    data,
    escapee_then_exit,
    start_ticks,
    stat_fields,
    wait_for_output,
)
from tests.limits_helpers import (
    block_device,
    cgroup_dir,
    children,
    require,
    require_namespaces,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and namespaces need root")

M = 1 << 20
PY = os.fsencode(sys.executable)  # not a wrapper script (pyenv shims fork): an interpreter


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with open_job_manager(config(tmp_path)) as m:
        yield m


async def wait_end(manager: JobManager, job_id: int) -> JobState:
    with trio.fail_after(TIMEOUT):
        return (await manager.wait(job_id)).state


def join(procs: tuple[str, ...], pid: int) -> None:
    for path in procs:
        Path(path).write_text(str(pid))


def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


async def output(manager: JobManager, job_id: int) -> str:
    """Everything an ended job wrote."""
    return data(await collect(manager.read_output(job_id))).decode()


# -- limits ------------------------------------------------------------------------


async def test_memory_limit_oom_kill_is_reported(manager: JobManager) -> None:
    require(manager, "memory")
    hog = await manager.start([PY, b"-c", b"b = bytearray(200 * 1024 * 1024)"], "alice",
                              limits=Limits(memory=32 * M))
    await wait_end(manager, hog.id)
    final = manager.status(hog.id)
    assert final.describe() == "killed: SIGKILL (out of memory)"
    assert final.oom and final.limits == Limits(memory=32 * M)
    assert final.peak_memory is not None and 8 * M < final.peak_memory <= 33 * M
    assert final.cpu_time is not None and final.cpu_time > 0

    fits = await manager.start([PY, b"-c", b"b = bytearray(16 * 1024 * 1024); print('ok')"],
                               "alice", limits=Limits(memory=96 * M))
    await wait_end(manager, fits.id)
    final = manager.status(fits.id)
    assert final.describe() == "exited: 0" and not final.oom
    assert final.peak_memory is not None and final.peak_memory > 16 * M


FORK_BOMB = b"""
import os, time
n = 0
for _ in range(100):
    try:
        if os.fork() == 0:
            time.sleep(100)
            os._exit(0)
        n += 1
    except OSError:
        pass
print('forked', n, flush=True)
time.sleep(100)
"""


async def test_pids_limit_contains_a_fork_bomb_that_can_still_be_stopped(
        manager: JobManager) -> None:
    require(manager, "pids")
    job = await manager.start([PY, b"-c", FORK_BOMB], "alice", limits=Limits(pids=8))
    assert job.pid is not None
    pids_dir = cgroup_dir(job.pid, "pids")
    out = await wait_for_output(manager, job.id, b"\n")
    forked = int(re.search(rb"forked (\d+)", out).group(1))  # type: ignore[union-attr]
    assert forked == 7  # the main process plus 7 children: fork failed beyond 8
    assert int((pids_dir / "pids.current").read_text()) <= 8
    assert "max 0" not in (pids_dir / "pids.events").read_text()  # it did refuse forks
    with trio.fail_after(TIMEOUT):
        final = await manager.stop(job.id)
    assert final.state is JobState.STOPPED
    assert not pids_dir.exists()  # empty and removed


async def test_cpu_limit_throttles_a_busy_loop(manager: JobManager) -> None:
    require(manager, "cpu")
    job = await manager.start([b"timeout", b"2", b"sh", b"-c", b"while :; do :; done"],
                              "alice", limits=Limits(cpus=0.2))
    await wait_end(manager, job.id)
    final = manager.status(job.id)
    assert final.describe() == "exited: 124"  # timeout ended it after 2 s of wall time
    # 0.2 CPUs for 2 s is 0.4 s of CPU; unthrottled it would be ~2 s.
    assert final.cpu_time is not None and 0 < final.cpu_time < 0.9, final.cpu_time


async def test_io_limits_are_written_and_bad_devices_refused(manager: JobManager) -> None:
    require(manager, "io")
    device = block_device()
    if device is None:
        pytest.skip("this machine has no block device to limit")
    rdev = os.stat(device).st_rdev
    job = await manager.start([b"sleep", b"100"], "alice", limits=Limits(
        io_read_bps=((device, 10 * M),), io_write_bps=((device, 5 * M),)))
    assert job.pid is not None
    layout = manager.cgroup_layout()
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    if layout["mode"] == "v1":
        blkio = cgroup_dir(job.pid, "blkio")
        assert f"{number} {10 * M}" in (blkio / "blkio.throttle.read_bps_device").read_text()
        assert f"{number} {5 * M}" in (blkio / "blkio.throttle.write_bps_device").read_text()
    await manager.stop(job.id, grace=0)
    with pytest.raises(EngineError, match=r"cannot enforce --io-read-bps: /dev/nonexistent: "
                       "No such file or directory"):
        await manager.start([b"true"], "alice",
                            limits=Limits(io_read_bps=(("/dev/nonexistent", M),)))
    with pytest.raises(EngineError, match="cannot enforce --io-write-bps: /dev/null is not a "
                       "block device"):
        await manager.start([b"true"], "alice", limits=Limits(io_write_bps=(("/dev/null", M),)))
    assert [s.id for s in manager.list()] == [job.id]  # refused starts leave no record


async def test_defaults_and_caps(tmp_path: Path) -> None:
    policy = LimitPolicy(default_memory=64 * M, max_memory=128 * M, max_cpus=1.0, max_pids=50,
                         max_io_bps=M)
    async with open_job_manager(config(tmp_path, limits=policy)) as manager:
        require(manager, "memory", "cpu", "pids")
        for limits, message in (
                (Limits(memory=256 * M), "limit exceeded: --memory 256M is above this server's "
                                         "maximum of 128M"),
                (Limits(cpus=1.5), "limit exceeded: --cpus 1.5 is above this server's maximum "
                                   "of 1"),
                (Limits(pids=51), "limit exceeded: --pids 51 is above this server's maximum "
                                  "of 50"),
                (Limits(cpus=0.001), "limit exceeded: --cpus 0.001 is below the kernel's "
                                     "minimum of 0.01"),
                (Limits(io_read_bps=(("/dev/null", 2 * M),)),
                 "limit exceeded: --io-read-bps 2M is above this server's maximum of 1M")):
            with pytest.raises(LimitExceeded) as info:
                await manager.start([b"true"], "alice", limits=limits)
            assert str(info.value) == message
        assert manager.list() == []  # no record, no ID used
        job = await manager.start([b"true"], "alice")  # asks for nothing
        assert job.id == 1
        # The default where there is one, else the cap: a cap nobody can escape.
        assert job.limits == Limits(memory=64 * M, cpus=1.0, pids=50)
        job = await manager.start([b"true"], "alice", limits=Limits(memory=100 * M))
        assert job.limits == Limits(memory=100 * M, cpus=1.0, pids=50)
        await wait_end(manager, job.id)


async def test_running_status_reports_usage(manager: JobManager) -> None:
    require(manager, "memory")
    job = await manager.start([b"sh", b"-c", b"echo ready; exec sleep 100"], "alice",
                              limits=Limits(memory=64 * M))
    await wait_for_output(manager, job.id, b"ready")
    live = manager.status(job.id)
    assert live.running and live.limits == Limits(memory=64 * M)
    assert live.peak_memory is not None and live.peak_memory > 0
    assert live.cpu_time is not None and live.cpu_time > 0
    final = await manager.stop(job.id)
    assert final.state is JobState.STOPPED and final.cpu_time is not None


# -- the cgroup kill ------------------------------------------------------------------

#: A process that leaves the job's session; it prints its pid once it has.
ESCAPE = b"setsid sh -c 'echo $$; exec sleep 1000' & "


async def test_stop_kills_a_setsid_escapee(manager: JobManager) -> None:
    require(manager, "pids")
    job = await manager.start([b"sh", b"-c", ESCAPE + b"exec sleep 1000"], "alice",
                              limits=Limits(pids=100))
    assert job.pid is not None
    escapee = int(await wait_for_output(manager, job.id, b"\n"))
    start = start_ticks(escapee)
    fields = stat_fields(escapee)
    assert fields is not None
    assert int(fields[3]) != job.pid  # its own session: the group and session scans miss it
    with trio.fail_after(TIMEOUT):
        final = await manager.stop(job.id)
    assert final.state is JobState.STOPPED
    assert not alive(escapee, start)  # gone before stop answered


async def test_an_escapee_left_behind_is_killed_when_the_job_ends(manager: JobManager,
                                                                  tmp_path: Path) -> None:
    require(manager, "pids")
    job = await manager.start(escapee_then_exit(tmp_path), "alice", limits=Limits(pids=100))
    escapee = int(await wait_for_output(manager, job.id, b"\n"))
    start = start_ticks(escapee)
    await wait_end(manager, job.id)
    assert manager.status(job.id).describe() == "exited: 0"
    assert not alive(escapee, start)


async def test_leftover_cgroups_of_a_dead_jobd_are_killed_and_removed(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        require(manager, "pids")
        cgroups = manager._ctx.cgroups  # what a jobd that died would have left behind
        assert cgroups is not None
        leftover = cgroups.create(999, Limits(pids=10), {})
    sleeper = await trio.lowlevel.open_process(["sleep", "1000"], start_new_session=True)
    try:
        join(leftover.procs, sleeper.pid)
        async with open_job_manager(config(tmp_path)) as manager:
            with trio.fail_after(TIMEOUT):
                assert await sleeper.wait() == -signal.SIGKILL
            assert not any(Path(p).parent.exists() for p in leftover.procs)
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_shutdown_stops_contained_jobs_and_removes_their_cgroups(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path)) as manager:
        require(manager, "pids")
        require_namespaces(manager)
        job = await manager.start([b"sleep", b"1000"], "alice",
                                  limits=Limits(pids=10, isolate=("pid",)))
        assert job.pid is not None
        dirs = [cgroup_dir(job.pid, "pids")]
    assert not dirs[0].exists()
    async with open_job_manager(config(tmp_path)) as manager:
        assert manager.status(job.id).state is JobState.STOPPED


# -- spawning through the helper ----------------------------------------------------


@pytest.mark.parametrize("isolate", [(), ("pid",)])
async def test_start_errors_read_as_without_limits(manager: JobManager, tmp_path: Path,
                                                   isolate: tuple[str, ...]) -> None:
    require(manager, "pids")
    if isolate:
        require_namespaces(manager)
    limits = Limits(pids=10, isolate=isolate)
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    cases = [
        ([b"nosuchcmd-xyz"], None, "error: command not found: nosuchcmd-xyz"),
        ([os.fsencode(script)], None, f"error: permission denied: {script}"),
        ([b"true"], b"/nonexistent-dir",
         "error: cannot change to directory /nonexistent-dir: No such file or directory"),
    ]
    for argv, cwd, expected in cases:
        status = await manager.start(argv, "alice", cwd=cwd, limits=limits)
        assert status.describe() == expected
        assert status.limits == limits
    ok = await manager.start([b"sh", b"-c", b"pwd; echo $X"], "alice", cwd=b"/tmp",
                             env={b"X": b"y", b"PATH": os.environb[b"PATH"]}, limits=limits)
    assert await wait_for_output(manager, ok.id, b"y\n") == b"/tmp\ny\n"


# -- isolation ----------------------------------------------------------------------


async def test_isolate_pid_gives_pid_1_and_its_own_proc(manager: JobManager) -> None:
    require_namespaces(manager)
    job = await manager.start([b"sh", b"-c", b"echo $$; ls /proc"], "alice",
                              limits=Limits(isolate=("pid",)))
    await wait_end(manager, job.id)
    out = (await output(manager, job.id)).split()
    assert out[0] == "1"
    pids = {int(name) for name in out[1:] if name.isdigit()}
    assert 1 in pids and pids <= {1, 2, 3}, pids  # sh and ls: the host's are not there
    assert manager.status(job.id).describe() == "exited: 0"


async def test_pid_namespace_relays_codes_and_signals(manager: JobManager) -> None:
    require_namespaces(manager)
    isolated = Limits(isolate=("pid",))
    job = await manager.start([b"sh", b"-c", b"exit 3"], "alice", limits=isolated)
    await wait_end(manager, job.id)
    assert manager.status(job.id).describe() == "exited: 3"

    # The command dies of a signal: the helper dies of the same one.
    job = await manager.start([b"sleep", b"1000"], "alice", limits=isolated)
    assert job.pid is not None
    [command] = children(job.pid)
    os.kill(command, signal.SIGKILL)
    await wait_end(manager, job.id)
    final = manager.status(job.id)
    assert final.describe() == "killed: SIGKILL" and not final.oom

    # A signal to the helper from anyone but jobd is forwarded to the command.
    job = await manager.start([b"sh", b"-c", b"trap 'echo got TERM; exit 5' TERM; echo ready; "
                               b"while :; do sleep 0.05; done"], "alice", limits=isolated)
    await wait_for_output(manager, job.id, b"ready")
    assert job.pid is not None
    await trio.run_process(["kill", "-TERM", str(job.pid)])
    await wait_end(manager, job.id)
    assert manager.status(job.id).describe() == "exited: 5"
    assert "got TERM" in await output(manager, job.id)


async def test_pid_1_without_handlers_is_stopped_by_sigkill(manager: JobManager) -> None:
    require_namespaces(manager)
    job = await manager.start([b"sleep", b"1000"], "alice", limits=Limits(isolate=("pid",)))
    assert job.pid is not None
    [command] = children(job.pid)
    start = start_ticks(command)
    before = trio.current_time()
    with trio.fail_after(TIMEOUT):
        final = await manager.stop(job.id)
    # PID 1 ignores SIGINT and SIGTERM it has no handler for: the ladder reaches SIGKILL.
    assert final.state is JobState.STOPPED and final.signal == "SIGKILL"
    assert trio.current_time() - before >= 2 * GRACE * 0.9
    assert not alive(command, start)


async def test_isolate_net_has_only_a_working_loopback(manager: JobManager) -> None:
    require_namespaces(manager)
    with socket.socket() as listener:  # a port that is open on the host
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = f"""
import os, socket
print(sorted(os.listdir('/sys/class/net')))
print([l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]])
print('host port', socket.socket().connect_ex(('127.0.0.1', {port})))
inside = socket.socket(); inside.bind(('127.0.0.1', 0)); inside.listen()
print('loopback', socket.create_connection(inside.getsockname()).fileno() > 0)
"""
        job = await manager.start([PY, b"-c", probe.encode()], "alice",
                                  limits=Limits(isolate=("net",)))
        await wait_end(manager, job.id)
    out = (await output(manager, job.id)).splitlines()
    assert manager.status(job.id).describe() == "exited: 0", out
    assert out[:2] == ["['lo']", "['lo']"]
    assert out[2].startswith("host port ") and out[2] != "host port 0"  # refused
    assert out[3] == "loopback True"


async def test_isolate_mount_keeps_mounts_inside(manager: JobManager, tmp_path: Path) -> None:
    require_namespaces(manager)
    target = tmp_path / "mnt"
    target.mkdir()
    job = await manager.start(
        [b"sh", b"-c", b'mount -t tmpfs jobd-test "$0" && touch "$0/inside" && echo ready '
                       b'&& exec sleep 1000', os.fsencode(target)],
        "alice", limits=Limits(isolate=("mount",)))
    out = await wait_for_output(manager, job.id, b"ready")
    assert out == b"ready\n"
    assert not (target / "inside").exists()
    assert not mounted(target)
    await manager.stop(job.id)
