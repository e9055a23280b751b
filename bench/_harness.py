"""Shared setup of the end-to-end benchmarks (bench/run.py): the contenders.

Everything runs on loopback and lives in one temporary directory:

* :class:`Jobd`: the real ``jobd`` (``.venv/bin/jobd``) with a dev PKI made by
  ``scripts/dev-pki`` and a fresh state directory; the CLI is the real
  ``.venv/bin/jobctl``, the library ``jobctl.connect_blocking``.
* :class:`Sshd`: Debian's OpenSSH server, ``sshd -D -f CONFIG`` on 127.0.0.1 and
  a free port, with a throwaway host key and a throwaway client key in its own
  authorized_keys file (root login by key allowed in that config only).
* :class:`TlsPipe`: socat speaking TLS 1.3 with the same dev PKI: the transport's
  limit, with no protocol, no log and no Python on either side.

``ensure_tools()`` runs bench/setup.sh (apt-get) when sshd or socat is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: scripts/dev-pki wraps `jobd ca` and `jobctl cert`: this environment's commands.
DEV_PKI_ENV = {**os.environ, "JOBD": str(BIN / "jobd"), "JOBCTL": str(BIN / "jobctl")}
JOBD = BIN / "jobd"
JOBCTL = BIN / "jobctl"
#: Another copy of the code to measure (``run.py --tree DIR``, e.g. an older
#: commit from ``git archive``): jobd and jobctl then run as ``python -m`` with
#: PYTHONPATH=DIR, which comes before the editable install.
CODE_TREE: Path | None = None


#: The bin directory of a venv with jobd installed from a wheel (:func:`install`):
#: when set, jobd, jobctl and the Python of the reference figures come from there.
INSTALLED: Path | None = None


def jobd_command() -> list[str]:
    if INSTALLED is not None:
        return [str(INSTALLED / "jobd")]
    return [sys.executable, "-P", "-m", "jobd"] if CODE_TREE else [str(JOBD)]


def jobctl_command() -> list[str]:
    if INSTALLED is not None:
        return [str(INSTALLED / "jobctl")]
    return [sys.executable, "-P", "-m", "jobctl"] if CODE_TREE else [str(JOBCTL)]


def python() -> str:
    """The Python that runs jobctl: the installed venv's, else this one."""
    return str(INSTALLED / "python") if INSTALLED is not None else sys.executable


def _builder() -> str:
    """A Python with pip and setuptools to build and install the wheel: this one, or
    the repository's .venv (made from the lock, which holds both) when this one has
    neither, as the lanes' venvs (scripts/lane.py) have only the package's ranges."""
    for candidate in (sys.executable, str(ROOT / ".venv" / "bin" / "python")):
        if Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import importlib.util as u, sys; sys.exit(not all("
                 "u.find_spec(m) for m in ('pip', 'setuptools')))"],
                capture_output=True).returncode == 0:
            return candidate
    raise SystemExit("bench: building a wheel needs pip and setuptools: make .venv/.installed")


def install(tree: Path, work: Path) -> Path:
    """What users get: build a wheel of ``tree`` (a copy of it, so that the build
    leaves nothing in the tree) and install it, not editable, into a new venv
    under ``work``; returns the venv's bin directory. An editable install adds its
    import finder to every Python start in its venv (about 10 ms here: pathlib,
    fnmatch, urllib.parse, ipaddress), which no installed package has. The
    dependencies are this environment's (installed from the hashed lock): a
    ``.pth`` file puts its site-packages after the venv's own."""
    src = work / "src"
    shutil.copytree(tree, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "build", "dist", "*.egg-info", ".*_cache",
        ".hypothesis", "state", "pki", "demo-state"))
    dist = work / "dist"
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    builder = _builder()
    subprocess.run([builder, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(dist), str(src)], **quiet)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "bench-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([builder, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", "--no-index",
                    *map(str, dist.glob("*.whl"))], **quiet)
    shutil.rmtree(src)
    return venv / "bin"
SSHD = "/usr/sbin/sshd"
READY_TIMEOUT = 20.0

sys.path.insert(0, str(ROOT))

import jobctl  # noqa: E402


def ensure_tools() -> None:
    """Install sshd, ssh, socat and openssl (bench/setup.sh) if one is missing."""
    if all(shutil.which(t) or Path(t).exists() for t in (SSHD, "ssh", "socat", "openssl")):
        return
    subprocess.run([str(ROOT / "bench" / "setup.sh")], check=True)


def child_env(work: Path, **extra: str) -> dict[str, str]:
    """The environment of jobd and jobctl: bytecode cached, as in an installed package.

    Some shells export PYTHONDONTWRITEBYTECODE=1, which would make every jobctl
    run compile its modules from source (about 30 ms); an installed package is
    byte-compiled. The cache goes to the work directory, not into the repository.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    if CODE_TREE is not None and INSTALLED is None:
        env["PYTHONPATH"] = str(CODE_TREE)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_tree_seconds(pid: int) -> float:
    """CPU time of a process plus that of the children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Load:
    """CPU time used on the machine by others while a figure ran.

    Others = the whole machine's busy time less this process and its children
    (reaped or alive, each with the children it reaped: jobd's jobs, sshd's
    sessions). Kernel threads that write back a job's log count as others too,
    so a small figure is normal.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float]:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        me = str(os.getpid())
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                ours += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        return system_busy_seconds(), ours

    def others(self) -> float:
        busy, ours = self._sample()
        return max(0.0, (busy - self._start[0]) - (ours - self._start[1]))


#: How long wait_until_quiet() waits at most (run.py --smoke: not at all).
QUIET_PATIENCE = 120.0


def wait_until_quiet(limit: float = 0.25) -> float:
    """Wait (up to QUIET_PATIENCE seconds) until the machine is idle but for us:
    less than ``limit`` of one CPU busy over half a second. Returns the last load."""
    patience = QUIET_PATIENCE
    if patience <= 0:
        return 0.0
    deadline = time.monotonic() + patience
    warned = False
    while True:
        load = Load()
        time.sleep(0.5)
        busy = load.others() / 0.5
        if busy < limit or time.monotonic() > deadline:
            return busy
        if not warned:
            print(f"  (machine busy: {busy:.1f} CPUs used by others; waiting up to "
                  f"{patience:.0f} s for quiet)", flush=True)
            warned = True


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    socat_version = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
    m = re.search(r"socat version (\S+)", socat_version)
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": f"Linux {platform.release()}",
        "python": f"Python {platform.python_version()}",
        "openssl": ssl.OPENSSL_VERSION,
        "ssh": ssh_version.split(",")[0],
        "socat": f"socat {m.group(1) if m else '?'}",
    }


def dirty_limit() -> int:
    """Bytes of dirty page cache beyond which the kernel makes writers wait
    (vm.dirty_bytes, else vm.dirty_ratio of the available memory)."""
    vm = Path("/proc/sys/vm")
    dirty_bytes = int((vm / "dirty_bytes").read_text())
    if dirty_bytes:
        return dirty_bytes
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return available * int((vm / "dirty_ratio").read_text()) // 100


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def run_timed(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None,
              stdout: int = subprocess.DEVNULL, timeout: float = 600) -> float:
    """Run a command to completion; its wall time in seconds. Fails on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run([os.fspath(a) for a in argv], stdin=subprocess.DEVNULL,
                          stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, in turn (A B C A B C ...)."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            results[name].append(run())
    return results


class _LogReader:
    """Collect a child's stderr lines in a thread; wait for one matching a pattern."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str):
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} not ready:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.5))


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Pki:
    """A dev PKI made by scripts/dev-pki: ca, server, alice (control), root (admin)."""

    def __init__(self, directory: Path):
        self.dir = directory
        subprocess.run([str(ROOT / "scripts" / "dev-pki"), str(directory)], check=True,
                       stdout=subprocess.DEVNULL, env=DEV_PKI_ENV)

    def path(self, name: str) -> str:
        return str(self.dir / name)


class Jobd:
    """A real jobd process on 127.0.0.1, port 0, with its own state directory."""

    def __init__(self, work: Path, pki: Pki, *extra: str):
        self.pki = pki
        self.state_dir = work / f"state-{time.monotonic_ns()}"
        cmd = [*jobd_command(), "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
               "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0",
               "--state-dir", str(self.state_dir), "--stop-grace", "0.5", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=child_env(work))
        self.log = _LogReader(self.proc, "jobd")
        self.port = int(self.log.wait_for(r"listening address=\S*:(\d+)").group(1))
        self.pid = self.proc.pid
        self.env = child_env(work, JOBCTL_CERTIFICATE=pki.path("alice.pem"),
                             JOBCTL_KEY=pki.path("alice.key"), JOBCTL_CA=pki.path("ca.pem"),
                             JOBCTL_ADDRESS="127.0.0.1", JOBCTL_PORT=str(self.port))
        # The first run of each command compiles and caches the bytecode.
        run_timed(self.cli("list"), env=self.env)

    def cli(self, *args: str) -> list[str]:
        """The jobctl command line (its common options come from ``self.env``)."""
        return [*jobctl_command(), *args]

    def connect(self) -> jobctl.BlockingClient:
        return jobctl.connect_blocking("127.0.0.1", self.port, certificate=self.pki.path(
            "alice.pem"), key=self.pki.path("alice.key"), ca=self.pki.path("ca.pem"))

    def connect_args(self) -> dict[str, str]:
        return {"certificate": self.pki.path("alice.pem"), "key": self.pki.path("alice.key"),
                "ca": self.pki.path("ca.pem")}

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.state_dir, ignore_errors=True)


class Sshd:
    """A throwaway OpenSSH server on 127.0.0.1 (``sshd -D -f CONFIG``)."""

    def __init__(self, work: Path):
        d = work / "ssh"
        d.mkdir(mode=0o700)
        self.dir = d
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                            "-f", str(d / key)], check=True)
        (d / "authorized_keys").write_bytes((d / "client_key.pub").read_bytes())
        (d / "authorized_keys").chmod(0o600)
        self.port = free_port()
        config = d / "sshd_config"
        config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
PidFile none
AuthorizedKeysFile {d / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
LogLevel INFO
MaxStartups 1000
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log = _LogReader(self.proc, "sshd")
        self.log.wait_for(r"Server listening on 127\.0\.0\.1 port")

    def command(self, *remote: str) -> list[str]:
        """``ssh -c aes128-gcm@openssh.com ... 127.0.0.1 CMD``."""
        return ["ssh", "-F", "/dev/null", "-c", "aes128-gcm@openssh.com",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-i", str(self.dir / "client_key"), "-p", str(self.port), "127.0.0.1", *remote]

    def stop(self) -> None:
        _stop(self.proc)


class TlsPipe:
    """socat speaking TLS 1.3 with the dev PKI (mutual authentication, like jobd).

    ``TlsPipe(work, pki, "head -c N /dev/zero")``: every connection gets the
    command's output. ``TlsPipe(work, pki, None)``: an echo server.
    """

    BUFFER = 256 * 1024  # socat's read size (its default, 8 KiB, would be the bottleneck)

    def __init__(self, work: Path, pki: Pki, command: str | None):
        self.pki = pki
        self.port = free_port()
        listen = (f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,"
                  f"cert={pki.path('server.pem')},key={pki.path('server.key')},"
                  f"cafile={pki.path('ca.pem')},verify=1,openssl-min-proto-version=TLS1.3")
        if command is None:
            argv = ["socat", "-b", str(self.BUFFER), listen, "PIPE"]
        else:
            argv = ["socat", "-U", "-b", str(self.BUFFER), listen, f"SYSTEM:{command}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log = _LogReader(self.proc, "socat")
        _wait_listening(self.port, self.proc)

    def client(self) -> list[str]:
        """A socat client that copies what the server sends to its stdout."""
        return ["socat", "-u", "-b", str(self.BUFFER),
                f"OPENSSL:127.0.0.1:{self.port},cert={self.pki.path('alice.pem')},"
                f"key={self.pki.path('alice.key')},cafile={self.pki.path('ca.pem')},"
                "openssl-min-proto-version=TLS1.3", "STDOUT"]

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.pki.path("alice.pem"), self.pki.path("alice.key"))
        ctx.load_verify_locations(self.pki.path("ca.pem"))
        return ctx

    def stop(self) -> None:
        _stop(self.proc)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until something accepts on 127.0.0.1:port (a plain connect; socat forks
    a child for it that fails its handshake, harmlessly)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            select.select([], [], [], 0.02)


@contextlib.contextmanager
def sampler(pid: int, interval: float = 0.05) -> Iterator[list[int]]:
    """Sample a process's VmRSS (KiB) every ``interval`` seconds while the block runs."""
    samples: list[int] = []
    done = threading.Event()

    def run() -> None:
        while not done.wait(interval):
            with contextlib.suppress(OSError, RuntimeError):
                samples.append(rss_kib(pid))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()
