"""jobd's spawn helper: puts a job's process in its cgroups and namespaces, then runs it.

jobd runs this file (never a shell, never another binary) for a job that has
limits or isolation::

    python -I -S .../jobd/engine/_spawn.py SPEC_FD ERROR_FD
    python -I -S /proc/self/fd/N SPEC_FD ERROR_FD N    (N: a memfd with this file compiled)

Theory of operation
-------------------

jobd cannot do this work itself between fork and exec: ``preexec_fn`` is
unsafe in a process with threads, and ``clone3(CLONE_INTO_CGROUP)`` through
ctypes would return into the interpreter in the child. So jobd starts this
small single-threaded program instead, with the job's stdin, stdout and
stderr already in place and in the job's own session. It reads its spec (a
``marshal``-ed dict: argv, env, cwd, the cgroup files to join, the namespaces)
from SPEC_FD and then, in this order:

0. with a gate (jobd's fallback where it cannot use cgroups to find its jobs
   after a crash: _tracking.py), waits until jobd has recorded this pid: a
   byte on the gate, or EOF (jobd died): exit without running anything;
1. joins the job's cgroups (writes its pid to each ``cgroup.procs``): from
   here on everything it and the command do is limited and accounted; a
   terminal job (its stdin is a pty's slave) takes the pty as its
   controlling terminal (``TIOCSCTTY``);
2. changes to the working directory;
3. with isolation: ``unshare`` a mount namespace (always: a PID namespace
   needs its own /proc, a network namespace its own /sys) made private, plus
   the network namespace (``lo`` brought up, sysfs mounted afresh) and the
   PID namespace;
4. without a PID namespace, execs the command: the job's main process keeps
   this pid. With one, forks: the child is PID 1 of the new namespace, mounts
   a fresh /proc and execs the command; this process stays outside as the
   job's main process, forwards the signals it is sent to the command, and
   when the command ends exits the same way (the same code, or the same
   signal raised on itself).

ERROR_FD is the write end of a pipe that is closed on exec. EOF on it tells
jobd the command runs; anything else is one failure record
``stage NUL errno NUL text``, after which this process exits 127. jobd turns
``exec`` and ``chdir`` failures into the same messages a direct spawn gives
(``command not found: X``).

Only the standard library, and as little of it as possible: every contained
start pays for this interpreter's start-up (docs/isolation.md has the
numbers). ctypes (for ``unshare``, ``mount`` and ``prctl``) is imported only
when the job asks for isolation.
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and signal (enum) cost milliseconds of start-up, paid per start
    import signal as _signal
    from typing import Any, NoReturn
else:
    import _signal

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC = 1 << 14
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

#: Signals this process forwards to the command when it stays as its parent.
FORWARDED = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM,
             _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGWINCH)
#: Signals whose default action dumps core: relaying one must not leave a core file.
CORE_SIGNALS = (_signal.SIGQUIT, _signal.SIGILL, _signal.SIGABRT, _signal.SIGFPE,
                _signal.SIGSEGV, _signal.SIGBUS, _signal.SIGSYS, _signal.SIGTRAP,
                _signal.SIGXCPU, _signal.SIGXFSZ)


class Failed(Exception):
    def __init__(self, stage: str, errno: int, text: str = "") -> None:
        super().__init__(stage)
        self.stage, self.errno, self.text = stage, errno, text


def main(argv: list[str]) -> NoReturn:
    spec_fd, err_fd = int(argv[1]), int(argv[2])
    if len(argv) > 3:
        os.close(int(argv[3]))  # the compiled copy of this file we were run from
    os.set_inheritable(err_fd, False)  # closed by a successful exec: jobd reads EOF
    try:
        try:
            spec = marshal.loads(_read_all(spec_fd))
        finally:
            os.close(spec_fd)
        run(spec, err_fd)
    except Failed as exc:
        _report(err_fd, exc.stage, exc.errno, exc.text)
    except BaseException as exc:  # a bug here must still reach jobd, not hang or vanish
        _report(err_fd, "helper", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def run(spec: dict[str, Any], err_fd: int) -> None:
    gate = spec.get("gate")
    if gate is not None:
        # jobd opens the gate once the job's record (with this pid) is committed. EOF
        # instead: jobd died first (or refused the start): run nothing (_tracking.py).
        go = os.read(gate, 1)
        os.close(gate)
        if go != b"1":
            os._exit(0)
    pid = str(os.getpid()).encode()
    for path in spec["join"]:
        _step("joining its cgroup", _write, path, pid)
    if spec.get("tty"):
        # A session leader (jobd started us with setsid) whose stdin is the pty's
        # slave: make it our controlling terminal, then the command's.
        import fcntl
        import termios

        _step("taking the terminal", fcntl.ioctl, 0, termios.TIOCSCTTY, 0)
    if spec["cwd"] is not None:
        _step("chdir", os.chdir, spec["cwd"])
    isolate = spec["isolate"]
    if not isolate:
        _exec(spec)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(stage: str, result: int) -> None:
        if result != 0:
            raise Failed(stage, ctypes.get_errno())

    flags = CLONE_NEWNS
    if "pid" in isolate:
        flags |= CLONE_NEWPID
    if "net" in isolate:
        flags |= CLONE_NEWNET
    call("unshare", libc.unshare(flags))
    call("making mounts private", libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
    if "net" in isolate:
        _step("bringing up lo", _loopback_up)
        call("mounting /sys", libc.mount(b"sysfs", b"/sys", b"sysfs",
                                         MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
    if "pid" not in isolate:
        _exec(spec)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, (_signal.SIGCHLD, *FORWARDED))
    child = _step("fork", os.fork)
    if child == 0:
        for sig in FORWARDED:
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        call("prctl", libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0))
        call("mounting /proc", libc.mount(b"proc", b"/proc", b"proc",
                                          MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
        _exec(spec)
    os.close(err_fd)
    _relay(child)


def _exec(spec: dict[str, Any]) -> NoReturn:
    # Python ignores these at start-up; an ignored signal stays ignored across exec.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])  # PATH from the job's env, like subprocess
    except OSError as exc:
        raise Failed("exec", exc.errno or 0) from None


def _relay(child: int) -> NoReturn:
    """Stay the command's parent: forward signals, then end the way it ended."""
    parent = os.getppid()  # jobd: its signals went to the whole process group already
    while True:
        info = _signal.sigwaitinfo((_signal.SIGCHLD, *FORWARDED))
        if info.si_signo == _signal.SIGCHLD:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                break
        elif info.si_pid != parent:
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:  # it is ending: SIGCHLD comes next
                continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in CORE_SIGNALS:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (sig,))
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


def _loopback_up() -> None:
    import _socket
    import fcntl

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = b"lo".ljust(40, b"\0")  # struct ifreq: name[16], then a union
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request)
        flags = int.from_bytes(answer[16:18], sys.byteorder) | IFF_UP
        request = b"lo".ljust(16, b"\0") + flags.to_bytes(2, sys.byteorder) + bytes(22)
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, request)
    finally:
        sock.close()


def _step(stage: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise Failed(stage, exc.errno or 0) from None


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _report(fd: int, stage: str, errno: int, text: str) -> None:
    record = b"\0".join((stage.encode(), str(errno).encode(),
                         text.encode(errors="replace")[:4000]))
    try:
        os.write(fd, record)
    except OSError:  # jobd is gone: nobody to tell
        return


if __name__ == "__main__":
    main(sys.argv)
