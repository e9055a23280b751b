"""Finding the cgroup layout jobd uses for its jobs (once, at start-up).

jobd takes the first of:

1. ``--cgroup-root DIR``, a cgroup v2 directory delegated to jobd (an error
   if it is not one);
2. jobd's own cgroup v2 (``0::/path`` in /proc/self/cgroup) when it offers
   at least one of the memory, cpu, io and pids controllers and jobd may
   write there (systemd's ``Delegate=yes``). A non-root cgroup that holds
   processes may not hand controllers to its children, so jobd first moves
   itself into a leaf, ``<own>/daemon``;
3. the v1 hierarchies (memory, cpu, cpuacct, blkio, pids, freezer) that are
   mounted and writable, each at jobd's own cgroup in it;
4. jobd's own cgroup v2 without controllers: no limits, but a cgroup per job
   still tracks and kills everything the job started.

Jobs live under ``<root>/jobd-<key>/job-<id>``. The key is a hash of the
state directory, so two jobd instances sharing a cgroup (tests, a second
instance by hand) never touch each other's jobs, while a restarted jobd
finds its predecessor's leftovers. Mount points come from
/proc/self/mountinfo (a mount may show a sub-tree of its hierarchy, e.g. in a
cgroup namespace), jobd's own cgroups from /proc/self/cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ._cgroups import (
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    Hierarchy,
    V1Hierarchy,
    V2Hierarchy,
    read_file,
    write_file,
)

_MOUNTINFO = "/proc/self/mountinfo"
_SELF_CGROUP = "/proc/self/cgroup"


@dataclass(frozen=True)
class _Mount:
    point: str
    root: str

    def dir_of(self, cgroup: str) -> str | None:
        """The directory of cgroup path ``cgroup`` under this mount, if it is visible."""
        if self.root == "/":
            return self.point.rstrip("/") + cgroup if cgroup != "/" else self.point
        if cgroup == self.root or cgroup.startswith(self.root + "/"):
            return self.point + cgroup[len(self.root):]
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> tuple[list[_Mount], dict[str, _Mount]]:
    """cgroup2 mounts (those under /sys/fs/cgroup first), and v1 mounts by controller."""
    v2: list[_Mount] = []
    v1: dict[str, _Mount] = {}
    with open(_MOUNTINFO) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            mount = _Mount(_unescape(fields[4]), _unescape(fields[3]))
            if tail[0] == "cgroup2":
                v2.append(mount)
            elif tail[0] == "cgroup":
                for option in tail[2].split(","):
                    if option in V1_CONTROLLERS:
                        v1.setdefault(option, mount)
    v2.sort(key=lambda m: not m.point.startswith("/sys/fs/cgroup"))
    return v2, v1


def _own_cgroups() -> dict[str, str]:
    """jobd's cgroup path per controller ("" for v2) from /proc/self/cgroup."""
    out: dict[str, str] = {}
    with open(_SELF_CGROUP) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def own_dir(controller: str) -> str | None:
    """This process's cgroup directory in the hierarchy of ``controller`` ("" for
    v2), or None if that is not visible here (blocking)."""
    try:
        v2, v1 = _mounts()
        path = _own_cgroups().get(controller)
    except OSError:
        return None
    if path is None:
        return None
    mounts = v2 if controller == "" else [v1[controller]] if controller in v1 else []
    for mount in mounts:
        found = mount.dir_of(path)
        if found is not None and os.path.isdir(found):
            return found
    return None


def _enable(directory: str, wanted: Iterable[str]) -> None:
    for c in wanted:
        with contextlib.suppress(OSError):
            write_file(f"{directory}/cgroup.subtree_control", f"+{c}")


def _v2_setup(base: str, key: str, *, own: str | None, is_root: bool) -> V2Hierarchy:
    """Enable what ``base`` offers for its children and make the jobs' parent."""
    offered = read_file(f"{base}/cgroup.controllers").split()
    wanted = tuple(c for c in V2_CONTROLLERS if c in offered)
    if wanted and own == base and not is_root:
        # No internal processes: a cgroup with processes cannot enable controllers
        # for its children. jobd moves into a leaf of its own.
        leaf = f"{base}/daemon"
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf)
        write_file(f"{leaf}/cgroup.procs", str(os.getpid()))
    _enable(base, wanted)
    parent = f"{base}/jobd-{key}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent)
    _enable(parent, (c for c in wanted
                     if c in read_file(f"{parent}/cgroup.controllers").split()))
    enabled = set(read_file(f"{parent}/cgroup.subtree_control").split())
    return V2Hierarchy(parent, frozenset(enabled & set(V2_CONTROLLERS)))


def detect(cgroup_root: Path | None, key: str) -> tuple[Hierarchy | None, str]:
    """The layout to use (see the module's comment), or None and why not (blocking).

    An unusable ``cgroup_root`` raises OSError: the operator asked for it.
    """
    if cgroup_root is not None:
        base = os.path.abspath(cgroup_root)
        if not os.path.isfile(f"{base}/cgroup.controllers"):
            raise OSError(errno.ENOTDIR, "--cgroup-root is not a cgroup v2 directory", base)
        own_v2 = _own_cgroups().get("")
        mounts, _ = _mounts()
        own_dir = next((d for m in mounts if own_v2 and (d := m.dir_of(own_v2))), None)
        return _v2_setup(base, key, own=own_dir, is_root=any(
            os.path.samefile(base, m.point) for m in mounts if os.path.isdir(m.point))), ""
    try:
        v2_mounts, v1_mounts = _mounts()
        own = _own_cgroups()
    except OSError as exc:
        return None, f"cannot read the cgroup layout: {exc}"
    v2_dir: str | None = None
    v2_mount: _Mount | None = None
    if "" in own:
        for m in v2_mounts:
            d = m.dir_of(own[""])
            if d is not None and os.path.isdir(d):
                v2_dir, v2_mount = d, m
                break
    if v2_dir is not None and v2_mount is not None and os.access(v2_dir, os.W_OK):
        try:
            offered = set(read_file(f"{v2_dir}/cgroup.controllers").split()) & set(V2_CONTROLLERS)
            if offered:
                found = _v2_setup(v2_dir, key, own=v2_dir, is_root=v2_dir == v2_mount.point)
                if found.resources:
                    return found, ""
                found.close()  # it could enable nothing (processes in the way): try v1
        except OSError:
            pass
    parents: dict[str, str] = {}
    for controller in V1_CONTROLLERS:
        mount = v1_mounts.get(controller)
        path = own.get(controller)
        d = mount.dir_of(path) if mount is not None and path is not None else None
        if d is not None and os.access(d, os.W_OK):
            # Made with the first job's cgroup, or, in the hierarchy that holds
            # jobd's own leaf (_tracking), at start: what a jobd that died leaves
            # there is how its successor finds its processes.
            parents[controller] = f"{d.rstrip('/')}/jobd-{key}"
    if parents:
        return V1Hierarchy(parents), ""
    if v2_dir is not None and v2_mount is not None and os.access(v2_dir, os.W_OK):
        try:
            return _v2_setup(v2_dir, key, own=v2_dir, is_root=v2_dir == v2_mount.point), ""
        except OSError as exc:
            return None, f"cannot set up cgroup v2 at {v2_dir}: {exc.strerror or exc}"
    return None, "no writable cgroup hierarchy (run jobd as root, or delegate a v2 subtree)"
