"""Helpers for the limits and isolation tests (tests/test_limits*.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobd.engine import JobManager
from jobd.engine._cgroup_layout import _mounts


def require(manager: JobManager, *resources: str) -> None:
    """Skip unless the machine gives jobs these limits (only where the kernel lacks them)."""
    layout = manager.cgroup_layout()
    if layout["mode"] == "none":
        pytest.skip(f"no usable cgroup hierarchy: {layout.get('reason')}")
    have = set(layout["controllers"].split(","))
    names = {"io": ("io", "blkio")}
    for resource in resources:
        if not have & set(names.get(resource, (resource,))):
            pytest.skip(f"the kernel offers no {resource} cgroup controller here")


def require_namespaces(manager: JobManager) -> None:
    isolation = manager.cgroup_layout()["isolation"]
    if isolation.startswith("none"):
        pytest.skip(f"namespaces unavailable: {isolation}")


def cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 directory of ``pid``'s cgroup in the hierarchy of ``controller``."""
    _, v1 = _mounts()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            found = v1[controller].dir_of(path)
            assert found is not None
            return Path(found)
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


def v2_cgroup(pid: int) -> str:
    """``pid``'s cgroup v2 path (the ``0::`` line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} has no cgroup v2 line")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the helper's child in a PID namespace)."""
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in raw.split()]


def block_device() -> str | None:
    """A block device node of this machine (the one holding /), or None."""
    dev = os.stat("/").st_dev
    for major_minor in (f"{os.major(dev)}:{os.minor(dev)}",):
        try:
            uevent = Path(f"/sys/dev/block/{major_minor}/uevent").read_text()
        except OSError:
            break
        for line in uevent.splitlines():
            if line.startswith("DEVNAME=") and Path(f"/dev/{line[8:]}").exists():
                return f"/dev/{line[8:]}"
    for name in sorted(os.listdir("/sys/block")):
        if Path(f"/dev/{name}").exists() and not name.startswith(("loop", "ram", "zram")):
            return f"/dev/{name}"
    return None
