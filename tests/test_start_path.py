"""Issue 26 item 3: the start path. A job without limits is born in its measuring
cgroup (v1: the spawning thread joins it, forks and returns; only in the
hierarchies that measure, place or find it), and no jobd thread stays in a job's
or an owner's cgroup afterwards."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .conftest import Pki, start_jobd


def _cgroups(text: str) -> dict[str, str]:
    """controller -> path, from /proc/PID/cgroup (v2's line under "")."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            out[controller] = path
    return out


def test_a_job_is_measured_from_its_first_instruction(pki: Pki, tmp_path: Path) -> None:
    """The job's process used to be moved into its cgroup by another thread's turn
    after exec: a ``cat /proc/self/cgroup`` was done reading before that, and saw
    jobd's cgroups. Now (v1) it reads its own cgroup in every hierarchy jobd uses."""
    server = start_jobd(pki, tmp_path / "state")
    try:
        layout = server.wait_for_log(r"info cgroups ")
        mode = re.search(r"mode=(\S+)", layout)
        assert mode is not None, layout
        for _ in range(3):
            run = server.jobctl("alice", "run", "cat", "/proc/self/cgroup")
            assert run.returncode == 0, run
            seen = _cgroups(run.stdout.decode())
            if mode.group(1) == "v1":  # this machine's layout decides which answer
                controllers = re.search(r"controllers=(\S+)", layout)
                assert controllers is not None, layout
                used = controllers.group(1).split(",")
                # Measuring, placing and finding it: not blkio, nor pids beside a freezer.
                skipped = {"blkio"} | ({"pids"} if "freezer" in used else set())
                names = {seen[c].rsplit("/", 1)[-1] for c in used if c not in skipped}
                assert len(names) == 1 and re.fullmatch(r"job-\d+", names.pop()), seen
                assert not any(re.search(r"/job-\d+$", seen[c]) for c in skipped & set(used)), seen
            else:  # v2 moves the whole process right after exec: it runs either way
                assert "" in seen, seen
        # Every thread of jobd went home: none is left in a job's or owner's group.
        for task in os.listdir(f"/proc/{server.proc.pid}/task"):
            text = Path(f"/proc/{server.proc.pid}/task/{task}/cgroup").read_text()
            assert "/job-" not in text and "/owner-" not in text, (task, text)
    finally:
        assert server.stop() == 0


def test_measuring_cgroups_skip_only_what_neither_measures_nor_finds() -> None:
    """Which v1 hierarchies a job without limits gets a cgroup in: not blkio, nor
    pids beside a freezer; but always the one jobd tracks its processes in (its
    leaf's), and co-mounted controllers together."""
    from jobd.engine._cgroups import V1Hierarchy

    full = {"memory": "/m", "cpu": "/c", "cpuacct": "/a", "blkio": "/b", "pids": "/p",
            "freezer": "/f"}
    assert set(V1Hierarchy(full)._measuring) == {"memory", "cpu", "cpuacct", "freezer"}
    no_freezer = {"memory": "/m", "cpu": "/c", "blkio": "/b", "pids": "/p"}
    assert set(V1Hierarchy(no_freezer)._measuring) == {"memory", "cpu", "pids"}
    only_blkio = {"blkio": "/b"}  # the leaf's hierarchy: how a restart finds the jobs
    assert V1Hierarchy(only_blkio)._measuring == only_blkio
    co_mounted = {"cpu": "/cc", "cpuacct": "/cc", "blkio": "/cc", "freezer": "/f"}
    assert V1Hierarchy(co_mounted)._measuring == co_mounted
