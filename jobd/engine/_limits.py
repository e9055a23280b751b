"""A job's limits: the server's defaults and caps, and what this machine can enforce.

:func:`resolve` turns what a start request asked for into the limits the job
runs with: an option the request leaves out takes the server's default (or,
without a default, its cap: a cap that a job could escape by not asking would
be no cap), and a request above a cap is :class:`LimitExceeded`. Then
:func:`check_enforceable` refuses, with a message naming what is missing, any
limit the cgroup layout cannot enforce and any namespace jobd cannot create:
a limit is never silently dropped. Both run before the job gets an ID.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TypeVar

from protocol import MAX_IO_DEVICES, Limits

from ._cgroups import Hierarchy
from ._types import BadLimits, EngineError, LimitExceeded, LimitPolicy, Unenforceable

#: The kernel's smallest CFS quota is 1 ms per 100 ms period.
MIN_CPUS = 0.01
#: CAP_SYS_ADMIN, which unshare(CLONE_NEWNS/NEWPID/NEWNET) needs without a user namespace.
CAP_SYS_ADMIN = 21
_NAMESPACE_FILES = {"pid": "pid", "mount": "mnt", "net": "net"}

N = TypeVar("N", int, float)


def format_size(value: int) -> str:
    """Bytes as an operator writes them: 256M, 1G, 1536K, 1000."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _pick(option: str, requested: N | None, default: N | None, cap: N | None,
          show: Callable[[N], str]) -> N | None:
    if requested is None:
        return default if default is not None else cap
    if cap is not None and requested > cap:
        raise LimitExceeded(f"limit exceeded: {option} {show(requested)} is above this "
                            f"server's maximum of {show(cap)}")
    return requested


def resolve(requested: Limits | None, policy: LimitPolicy) -> Limits | None:
    """The limits the job runs with (None: none at all). Raises LimitExceeded."""
    req = requested if requested is not None else Limits()
    memory = _pick("--memory", req.memory, policy.default_memory, policy.max_memory,
                   format_size)
    cpus = _pick("--cpus", req.cpus, policy.default_cpus, policy.max_cpus, "{:g}".format)
    pids = _pick("--pids", req.pids, policy.default_pids, policy.max_pids, str)
    if cpus is not None and cpus < MIN_CPUS:
        raise LimitExceeded(f"limit exceeded: --cpus {cpus:g} is below the kernel's "
                            f"minimum of {MIN_CPUS:g}")
    for option, entries in (("--io-read-bps", req.io_read_bps),
                            ("--io-write-bps", req.io_write_bps)):
        # Linear, and bounded: the protocol caps the entries (Start refuses more),
        # and a caller of the engine API gets the same cap here.
        if len(entries) > MAX_IO_DEVICES:
            raise BadLimits(f"{option}: {len(entries)} devices, more than "
                            f"{MAX_IO_DEVICES}")
        seen: set[str] = set()
        for device, rate in entries:
            _pick(option, rate, None, policy.max_io_bps, format_size)
            if device in seen:
                raise BadLimits(f"{option}: {device} is given more than once")
            seen.add(device)
    limits = Limits(memory=memory, cpus=cpus, pids=pids, io_read_bps=req.io_read_bps,
                    io_write_bps=req.io_write_bps, isolate=req.isolate)
    return None if limits.is_empty() else limits


def devices(limits: Limits) -> dict[str, str]:
    """``MAJOR:MINOR`` of every device the io limits name. Raises EngineError, and
    BadLimits when two names of one direction are one device (``/dev/sda`` and a
    symbolic link to it): the kernel keeps one limit per device."""
    out: dict[str, str] = {}
    for option, entries in (("--io-read-bps", limits.io_read_bps),
                            ("--io-write-bps", limits.io_write_bps)):
        named: dict[str, str] = {}
        for device, _ in entries:
            try:
                st = os.stat(device)
            except OSError as exc:
                raise Unenforceable(f"cannot enforce {option}: {device}: "
                                  f"{exc.strerror or exc}") from None
            if not stat.S_ISBLK(st.st_mode):
                raise Unenforceable(f"cannot enforce {option}: {device} is not a block device")
            number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if number in named:
                raise BadLimits(f"{option}: {device} and {named[number]} are one device "
                                f"({number}): give it once")
            named[number] = device
            out[device] = number
    return out


def _missing(resource: str, option: str, cgroups: Hierarchy | None, reason: str) -> str:
    v1 = "blkio" if resource == "io" else resource
    text = f"cannot enforce {option}: no {resource} controller"
    if cgroups is None:
        return f"{text} (cgroup v1 {v1} or a delegated v2 subtree with {resource}; {reason})"
    where = cgroups.describe().get("root", "")
    if cgroups.mode == "v2":
        return (f"{text} in the cgroup v2 subtree {where} (enable {resource} in its "
                f"parent's cgroup.subtree_control, or delegate it with Delegate=yes)")
    return f"{text} (no writable cgroup v1 {v1} hierarchy)"


def check_enforceable(limits: Limits, cgroups: Hierarchy | None, cgroup_reason: str,
                      isolation_reason: str | None) -> None:
    """Raise EngineError naming the first limit or namespace this machine cannot give."""
    have = cgroups.resources if cgroups is not None else frozenset()
    for resource, option, wanted in (
            ("memory", "--memory", limits.memory is not None),
            ("cpu", "--cpus", limits.cpus is not None),
            ("pids", "--pids", limits.pids is not None),
            ("io", "--io-read-bps", bool(limits.io_read_bps)),
            ("io", "--io-write-bps", bool(limits.io_write_bps))):
        if wanted and resource not in have:
            raise Unenforceable(_missing(resource, option, cgroups, cgroup_reason))
    if limits.isolate and isolation_reason is not None:
        raise Unenforceable(f"cannot enforce --isolate {','.join(limits.isolate)}: "
                          f"{isolation_reason}")


def isolation_problem() -> str | None:
    """Why jobd cannot create namespaces for jobs, or None if it can."""
    for kind, name in _NAMESPACE_FILES.items():
        if not os.path.exists(f"/proc/self/ns/{name}"):
            return f"the kernel has no {kind} namespaces (/proc/self/ns/{name})"
    try:
        with open("/proc/self/status") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")),
                        0)
    except OSError as exc:
        return f"cannot read jobd's capabilities: {exc}"
    if not caps >> CAP_SYS_ADMIN & 1:
        return "jobd lacks CAP_SYS_ADMIN (namespaces need root)"
    return None


def check_policy(policy: LimitPolicy, cgroups: Hierarchy | None, cgroup_reason: str) -> None:
    """Refuse at start-up server defaults and caps this machine cannot enforce."""
    for resource, option, values in (
            ("memory", "memory", (policy.default_memory, policy.max_memory)),
            ("cpu", "cpus", (policy.default_cpus, policy.max_cpus)),
            ("pids", "pids", (policy.default_pids, policy.max_pids)),
            ("io", "io-bps", (policy.max_io_bps,))):
        if any(v is not None for v in values) and (
                cgroups is None or resource not in cgroups.resources):
            raise EngineError(_missing(resource, f"--default-{option}/--max-{option}"
                                       if resource != "io" else "--max-io-bps",
                                       cgroups, cgroup_reason))
