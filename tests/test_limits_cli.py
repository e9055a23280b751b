"""Limits and isolation end to end: real jobd processes and the jobctl CLI (SPEC §8)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import JOBCTL, JOBD, PYTHON, RUN_CWD, JobdProcess, Pki, start_jobd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and namespaces need root")

M = 1 << 20
TIMEOUT = 30.0  # a deadline for what takes milliseconds: generous for a loaded machine


@pytest.fixture(scope="module")
def capped(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobdProcess]:
    server = start_jobd(pki, tmp_path_factory.mktemp("limits") / "state",
                        "--max-memory", "1G", "--max-pids", "1000")
    try:
        layout = server.wait_for_log(r" cgroups mode=")
        if "mode=none" in layout or "controllers=none" in layout:
            pytest.skip(f"no cgroup controllers on this machine: {layout}")
        yield server
    finally:
        assert server.stop() == 0


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result
    return result.stdout.decode()


def start(server: JobdProcess, *words: str) -> int:
    return int(ok(server.jobctl("alice", "start", *words)))


def test_oom_kill_end_to_end(capped: JobdProcess) -> None:
    job = start(capped, "--memory", "32M", PYTHON, "-c", "b = bytearray(200 * 1024 * 1024)")
    ok(capped.jobctl("alice", "stream", str(job)))  # returns when the job has ended
    assert ok(capped.jobctl("alice", "status", str(job))) == "killed: SIGKILL (out of memory)\n"
    status = json.loads(ok(capped.jobctl("alice", "status", str(job), extra=["--json"])))
    assert status["status"] == "killed: SIGKILL (out of memory)" and status["oom"] is True
    # What it asked for, and the server's cap where it asked for nothing.
    assert status["limits"] == {"memory": 32 * M, "pids": 1000}
    assert 0 < status["peak_memory"] <= 33 * M and status["cpu_time"] > 0
    listed = json.loads(ok(capped.jobctl("alice", "list", extra=["--json"])))
    [entry] = [s for s in listed["jobs"] if s["id"] == job]
    assert {k: entry[k] for k in ("limits", "oom", "peak_memory", "cpu_time")} == \
        {k: status[k] for k in ("limits", "oom", "peak_memory", "cpu_time")}


def test_isolate_pid_end_to_end(capped: JobdProcess) -> None:
    job = start(capped, "--isolate", "pid", "sh", "-c", "echo $$")
    assert ok(capped.jobctl("alice", "stream", str(job))) == "1\n"
    assert ok(capped.jobctl("alice", "status", str(job))) == "exited: 0\n"
    status = json.loads(ok(capped.jobctl("alice", "status", str(job), extra=["--json"])))
    assert status["limits"]["isolate"] == ["pid"]


def test_above_a_cap_is_limit_exceeded(capped: JobdProcess) -> None:
    for words, message in (
            (["--memory", "2G"], "limit exceeded: --memory 2G is above this server's maximum "
                                 "of 1G"),
            (["--pids", "5000"], "limit exceeded: --pids 5000 is above this server's maximum "
                                 "of 1000")):
        result = capped.jobctl("alice", "start", *words, "true")
        assert result.returncode == 1
        assert result.stdout == b""
        assert result.stderr.decode() == message + "\n"


def test_a_limit_the_machine_cannot_enforce_is_an_error(capped: JobdProcess) -> None:
    result = capped.jobctl("alice", "start", "--io-read-bps", "/dev/nosuch=1M", "true")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == \
        "cannot enforce --io-read-bps: /dev/nosuch: No such file or directory\n"


def test_jobd_options(pki: Pki, tmp_path: Path) -> None:
    help_text = subprocess.run([*JOBD, "--help"], capture_output=True,
                               check=True, cwd=RUN_CWD).stdout.decode()
    for option in ("--default-memory", "--max-memory", "--default-cpus", "--max-cpus",
                   "--default-pids", "--max-pids", "--max-io-bps", "--cgroup-root"):
        assert option in help_text
    base = [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
            "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0",
            "--state-dir", str(tmp_path / "state")]
    usage = subprocess.run([*base, "--default-memory", "2G", "--max-memory", "1G"],
                           capture_output=True, cwd=RUN_CWD, timeout=30)
    assert usage.returncode == 2 and b"--default-memory is above --max-memory" in usage.stderr
    bad = subprocess.run([*base, "--cgroup-root", str(tmp_path)], capture_output=True,
                         cwd=RUN_CWD, timeout=30)
    lines = bad.stderr.decode().splitlines()
    assert bad.returncode == 1
    assert len(lines) == 1 and "startup-failed" in lines[0], lines
    assert "not a cgroup v2 directory" in lines[0]


def test_restart_after_a_crash_kills_what_the_job_left(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_jobd(pki, state)
    try:
        job = start(server, "--pids", "100", "sh", "-c",
                    "setsid sh -c 'echo $$; exec sleep 1000' & exec sleep 1000")
        escapee = int(_first_line(server, job))
        pidfd = os.pidfd_open(escapee)
    finally:
        server.proc.kill()  # jobd dies uncleanly; the job and its escapee live on
        server.proc.wait()
    try:
        server = start_jobd(pki, state)
        try:
            # Killed during start-up, before jobd listened.
            assert select.select([pidfd], [], [], TIMEOUT)[0] == [pidfd]
            assert ok(server.jobctl("alice", "status", str(job))) == \
                "error: lost: jobd stopped while the job ran\n"
            assert "removed cgroup job-1 left over by a previous jobd, after killing its " \
                "processes" in server.log_text()
        finally:
            assert server.stop() == 0
    finally:
        os.close(pidfd)


def _first_line(server: JobdProcess, job: int) -> str:
    """The job's first line of output, read from a live `jobctl stream` (no polling)."""
    cmd = [*JOBCTL, *server.pki.client_args("alice"), "-a", server.address,
           "-p", str(server.port), "stream", str(job)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=RUN_CWD) as stream:
        assert stream.stdout is not None
        ready, _, _ = select.select([stream.stdout], [], [], TIMEOUT)
        assert ready, "no output"
        line = stream.stdout.readline().decode()
        stream.send_signal(signal.SIGINT)
    return line


