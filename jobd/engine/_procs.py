"""Process helpers: /proc scanning, process identity, pidfd waits and signals.

A job is its process group (pgid = the main process's pid, as the job runs in
its own session) plus any process of its session that moved to another group.
Once the main process is reaped, the other members are not our children: we
find them in ``/proc/*/stat``, wait for them with ``pidfd_open`` plus
``trio.lowlevel.wait_readable`` (no polling, no ``waitpid(-1)``), and signal a
single process through a pidfd after checking its start time, so a recycled
pid is never hit. Zombies count as gone: they hold no resources and whoever
is their parent (or init) reaps them.

A pid number stays allocated while any process uses it as its process group or
session ID, so ``killpg(pgid, ...)`` cannot reach a stranger while the job's
group has a member; members are also required to have started no earlier than
the job's main process.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import marshal
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import trio

_PROC = "/proc"
#: The stdin pipe of a job started with ``stdin``: as large as Linux lets anyone
#: make one (1 MiB), so that bulk input costs few writes and wakeups.
STDIN_PIPE_SIZE = 1024 * 1024


class Spawned(NamedTuple):
    popen: subprocess.Popen[bytes]  # kept until reaped (it reaps, and must not be collected before)
    stdout: int  # read ends, non-blocking (a terminal job: the pty's master)
    stderr: int  # -1 for a terminal job: its stderr is the terminal too
    pidfd: int  # readable once the process has exited
    #: Its start time (/proc/<pid>/stat), read in the spawning thread while it
    #: cannot have been reaped (None if it could not be read).
    start: int | None = None
    #: A gated spawn (see _tracking): the spawn helper waits before it execs the
    #: command. ``gate(True)`` lets it run and returns once the command runs, or
    #: raises as a spawn would; ``gate(False)`` makes it exit without running it
    #: (the caller reaps it). Blocking; call exactly once. None: not gated.
    gate: Callable[[bool], None] | None = None
    #: The write end of its stdin (a pipe, or the pty's master again), non-blocking;
    #: -1: its stdin is /dev/null.
    stdin: int = -1


class Stdio(NamedTuple):
    """How a job's stdin is set up: /dev/null, a pipe, or a pseudo-terminal.

    ``tty`` is (rows, cols) for a terminal job, else None.
    """

    pipe: bool = False
    tty: tuple[int, int] | None = None


NO_INPUT = Stdio()


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty (the kernel signals SIGWINCH to its foreground group)."""
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


#: The spawn helper (see _spawn.py), run with the interpreter jobd runs on.
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawn.py")
_helper_code: list[int] = []  # a memfd holding the helper compiled, once made
_helper_lock = threading.Lock()


def _compiled_helper() -> int | None:
    """A memfd with the helper as a .pyc, made once (blocking), or None if that fails.

    Python runs a .pyc given as the script (it checks the magic number), and a
    source script is compiled on every run: this saves ~2.5 ms per contained
    start (docs/isolation.md). The memfd stays open, close-on-exec, for jobd's life.
    """
    with _helper_lock:
        if not _helper_code:
            try:
                with open(HELPER, "rb") as f:
                    source = f.read()
                code = compile(source, HELPER, "exec", dont_inherit=True, optimize=0)
                pyc = (importlib.util.MAGIC_NUMBER + bytes(4) + bytes(4)
                       + len(source).to_bytes(4, "little") + marshal.dumps(code))
                fd = os.memfd_create("jobd-spawn-helper", os.MFD_CLOEXEC)
            except (OSError, SyntaxError, ValueError):
                _helper_code.append(-1)
            else:
                try:
                    _pwrite_all(fd, pyc)
                except OSError:
                    os.close(fd)
                    fd = -1
                _helper_code.append(fd)
        return _helper_code[0] if _helper_code[0] >= 0 else None


def _pwrite_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, len(data) - len(view)):]


class SetupError(OSError):
    """The spawn helper could not put the job in its cgroup or namespaces."""

    def __init__(self, stage: str, errno_: int, text: str = "") -> None:
        super().__init__(errno_, text or os.strerror(errno_))
        self.stage = stage


def spawn(argv: Sequence[bytes], cwd: bytes | None,
          env: Mapping[bytes, bytes] | None, stdio: Stdio = NO_INPUT) -> Spawned:
    """Start a job's main process (blocking: call from a worker thread).

    Own session and process group, stdin /dev/null (or a pipe: ``stdio``),
    stdout and stderr on two pipes, no shell, no preexec_fn. Raises OSError if
    it cannot be executed. Plain fds rather than trio.Process: a running job
    costs a few KiB less. A terminal job goes through the spawn helper
    (:func:`spawn_contained`), which makes the pty its controlling terminal.
    """
    if stdio.tty is not None:
        return spawn_contained(argv, cwd, env, (), (), stdio)
    return _start(list(argv), cwd=cwd, env=dict(env) if env is not None else None,
                  stdio=stdio)


def spawn_contained(argv: Sequence[bytes], cwd: bytes | None,
                    env: Mapping[bytes, bytes] | None, join: Sequence[str],
                    isolate: Sequence[str], stdio: Stdio = NO_INPUT, *,
                    gated: bool = False) -> Spawned:
    """Like :func:`spawn`, through the spawn helper: it joins the cgroups whose
    ``cgroup.procs`` files are ``join`` and the namespaces ``isolate`` (and for
    a terminal job takes the pty as its controlling terminal) before it execs
    the command (blocking: call from a worker thread).

    Returns once the command runs, or raises: OSError as :func:`spawn` would
    (exec and chdir failures, same errno and file name), SetupError for the rest.
    ``gated``: returns as soon as the helper runs; it waits for ``Spawned.gate``.
    """
    code_fd = _compiled_helper()
    spec_fd = os.memfd_create("jobd-spawn", os.MFD_CLOEXEC)
    mine: list[int] = [spec_fd]  # our descriptors, each closed exactly once
    try:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        mine += (report_r, report_w)
        passed = [spec_fd, report_w]
        gate_w = -1
        if gated:
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            mine += (gate_r, gate_w)
            passed.append(gate_r)
        _pwrite_all(spec_fd, marshal.dumps({
            "argv": list(argv), "cwd": cwd, "join": list(join), "isolate": list(isolate),
            "env": dict(env) if env is not None else dict(os.environb),
            "gate": gate_r if gated else None, "tty": stdio.tty is not None,
        }))
    except BaseException:
        for fd in mine:
            os.close(fd)
        raise

    def close(fd: int) -> None:
        if fd in mine:
            mine.remove(fd)
            os.close(fd)

    def check(popen: subprocess.Popen[bytes]) -> None:
        close(report_w)  # ours: EOF comes once the helper's copy closes on exec
        chunks = []
        while chunk := os.read(report_r, 65536):
            chunks.append(chunk)
        close(report_r)
        if chunks:
            popen.wait()
            raise _failure(b"".join(chunks), argv[0], cwd)

    try:
        try:
            args = [sys.executable, "-I", "-S", HELPER, str(spec_fd), str(report_w)]
            fds: tuple[int, ...] = tuple(passed)
            if code_fd is not None:  # the compiled helper; it closes its copy first thing
                args[3] = f"/proc/self/fd/{code_fd}"
                args.append(str(code_fd))
                fds += (code_fd,)
            spawned = _start(args, cwd=None, env={}, pass_fds=fds,
                             check=None if gated else check, stdio=stdio)
        except SetupError:
            raise
        except OSError as exc:
            if exc.filename == sys.executable:
                raise SetupError("starting the spawn helper", exc.errno or 0) from None
            raise
    except BaseException:
        for fd in list(mine):
            close(fd)
        raise
    for fd in list(mine):  # the helper has its copies; keep the gate and the report
        if fd not in (gate_w, report_r, report_w):
            close(fd)
    if not gated:
        return spawned
    popen = spawned.popen

    def gate(go: bool) -> None:
        try:
            if go:
                os.write(gate_w, b"1")
            close(gate_w)  # without the byte: EOF, the helper exits at once
            if go:
                check(popen)
        finally:
            for fd in list(mine):
                close(fd)

    return spawned._replace(gate=gate)


def _failure(report: bytes, argv0: bytes, cwd: bytes | None) -> OSError:
    """The helper's failure record as the OSError a direct spawn would raise."""
    stage, errno_, text = [*report.split(b"\0", 2), b"", b""][:3]
    number = int(errno_) if errno_.isdigit() else 0
    if stage == b"exec":
        return OSError(number, os.strerror(number), os.fsdecode(argv0))
    if stage == b"chdir" and cwd is not None:
        return OSError(number, os.strerror(number), os.fsdecode(cwd))
    return SetupError(stage.decode(errors="replace"), number, text.decode(errors="replace"))


def _start(args: list[bytes] | list[str], *, cwd: bytes | None,
           env: dict[bytes, bytes] | dict[str, str] | None, pass_fds: Sequence[int] = (),
           check: Callable[[subprocess.Popen[bytes]], None] | None = None,
           stdio: Stdio = NO_INPUT) -> Spawned:
    fds: list[int] = []  # ours to close on failure
    child: list[int] = []  # the child's ends: closed once it has them
    try:
        stdin: int | None = subprocess.DEVNULL
        in_w = -1
        if stdio.tty is not None:
            # The job's stdin, stdout and stderr are the pty's slave; we keep the
            # master (read: its output; a duplicate: its input).
            master, slave = os.openpty()  # both close-on-exec
            fds.append(master)
            child.append(slave)
            set_window_size(master, *stdio.tty)
            out_r, out_w, err_r, err_w = master, slave, -1, slave
            stdin = slave
            in_w = os.dup(master)
            fds.append(in_w)
        else:
            if stdio.pipe:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                fds.append(in_w)
                child.append(in_r)
                stdin = in_r
                with contextlib.suppress(OSError):  # over the user's pipe quota: keep it
                    fcntl.fcntl(in_w, fcntl.F_SETPIPE_SZ, STDIN_PIPE_SIZE)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds.append(out_r)
            child.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds.append(err_r)
            child.append(err_w)
        popen = subprocess.Popen(
            args, stdin=stdin, stdout=out_w, stderr=err_w,
            start_new_session=True, cwd=cwd, env=env, pass_fds=tuple(pass_fds),
        )
        for fd in child:
            os.close(fd)
        child = []
        if check is not None:
            check(popen)
    except BaseException:
        for fd in fds + child:
            os.close(fd)
        raise
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:  # EMFILE: we could not supervise it
        signal_group(popen.pid, signal.SIGKILL)
        popen.wait()
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:
        os.set_blocking(fd, False)
    # The start time here, not in the event loop: one more file opened and read per
    # start, and nothing reaps the process before the loop has the pidfd (issue 26).
    return Spawned(popen, out_r, err_r, pidfd, start=start_time(popen.pid), stdin=in_w)


class ProcInfo(NamedTuple):
    pid: int
    state: str  # R, S, D, Z, T, ...
    pgrp: int
    session: int
    start: int  # start time in clock ticks since boot (/proc/<pid>/stat field 22)

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def _parse_stat(pid: int, raw: bytes) -> ProcInfo | None:
    # The command name (field 2) is in parentheses and may hold spaces and ')':
    # everything after the last ')' is fields 3.. separated by single spaces.
    rest = raw[raw.rfind(b")") + 2:].split()
    if len(rest) < 20:
        return None
    return ProcInfo(pid, rest[0].decode(), int(rest[2]), int(rest[3]), int(rest[19]))


def read_stat(pid: int) -> ProcInfo | None:
    """The process's stat fields, or None if there is no such process."""
    try:
        fd = os.open(f"{_PROC}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _parse_stat(pid, raw)


def start_time(pid: int) -> int | None:
    info = read_stat(pid)
    return None if info is None else info.start


def scan() -> list[ProcInfo]:
    """Every process on the system (blocking, ~10 us per process: use a thread)."""
    out = []
    for name in os.listdir(_PROC):
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None:
                out.append(info)
    return out


def boot_id() -> str:
    """This boot's ID: start times are only comparable within one boot."""
    try:
        with open(f"{_PROC}/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def job_members(snapshot: list[ProcInfo], pgid: int, since: int) -> list[ProcInfo]:
    """Live processes of the job whose group/session is ``pgid``, started at ``since`` or later."""
    return [p for p in snapshot
            if p.alive and (p.pgrp == pgid or p.session == pgid) and p.start >= since]


def group_may_exist(pgid: int) -> bool:
    """False when no process (not even a zombie) is left in the group: no scan needed."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _open_verified(info: ProcInfo) -> int | None:
    """A pidfd for the process ``info`` describes, or None if it is gone or a zombie.

    The start time is checked after the pidfd is open: the pidfd then refers to
    exactly the process we meant, even if its pid is recycled later.
    """
    try:
        pidfd = os.pidfd_open(info.pid)
    except (ProcessLookupError, PermissionError):
        return None
    now = read_stat(info.pid)
    if now is None or now.start != info.start or not now.alive:
        os.close(pidfd)
        return None
    return pidfd


def signal_process(info: ProcInfo, sig: int) -> bool:
    """Send ``sig`` to that very process (not a recycled pid). True if it was sent."""
    pidfd = _open_verified(info)
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(pidfd)
    return True


async def wait_exit(info: ProcInfo) -> None:
    """Wait until that process has exited (it may remain a zombie)."""
    pidfd = _open_verified(info)
    if pidfd is None:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def lost_job_processes(snapshot: list[ProcInfo], pid: int, start: int) -> list[ProcInfo]:
    """What is left of a job whose jobd died: its main process and group/session members.

    If a process with the job's pid exists with another start time, the pid was
    recycled; its group and session then belong to the new process (a pid is not
    reused while a group or session still uses it), so nothing is the job's.
    """
    for p in snapshot:
        if p.pid == pid and p.start != start:
            return []
    return [p for p in snapshot if p.alive and p.start >= start
            and (p.pid == pid or p.pgrp == pid or p.session == pid)]


class ProcScanner:
    """Shares /proc scans between jobs.

    A scan costs ~10 us per process on the host and runs in a worker thread.
    A caller needs a scan that *began after its request*; callers that queue
    while one runs share the next one, so a burst (a shutdown stopping 1,000
    jobs) costs a few scans, not one per job.
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._started = 0  # scans begun
        self._finished = 0  # number (1-based) of the last scan that completed
        self._snapshot: list[ProcInfo] = []

    async def snapshot(self) -> list[ProcInfo]:
        requested_after = self._started
        async with self._lock:
            if self._finished > requested_after:
                return self._snapshot  # began after our request: fresh enough
            self._started += 1
            number = self._started
            snap = await trio.to_thread.run_sync(scan)
            self._snapshot, self._finished = snap, number
            return snap
