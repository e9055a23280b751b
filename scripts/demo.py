#!/usr/bin/env python3
"""`make demo`: a dev PKI, a real jobd on ::1, and jobctl driving it end to end.

Runs run / start / wait / status / output / stop / list as alice (control)
and a refused start as olga (observe), then stops jobd with SIGTERM. Exits 0
only if every step behaved as documented.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jobd-demo-") as tmp:
        pki = Path(tmp) / "pki"
        say(f"making a dev PKI in {pki} (scripts/dev-pki)")
        subprocess.run([str(ROOT / "scripts" / "dev-pki"), str(pki)], check=True,
                       stdout=subprocess.DEVNULL)
        jobd_cmd = [str(BIN / "jobd"), "-c", str(pki / "server.pem"), "-k",
                    str(pki / "server.key"), "-C", str(pki / "ca.pem"), "-a", "::1", "-p", "0",
                    "--state-dir", str(Path(tmp) / "state")]
        say("starting: " + shlex.join(["jobd", *jobd_cmd[1:]]))
        jobd = subprocess.Popen(jobd_cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            log: list[str] = []
            port = wait_for_port(jobd, log)
            threading.Thread(target=drain, args=(jobd, log), daemon=True).start()
            return drive(pki, port, jobd, log)
        finally:
            if jobd.poll() is None:
                jobd.kill()
                jobd.wait()


def wait_for_port(jobd: subprocess.Popen[bytes], log: list[str]) -> int:
    """Read jobd's log until its "listening" line, within 20 s."""
    assert jobd.stderr is not None
    fd = jobd.stderr.fileno()
    deadline = time.monotonic() + 20
    buf = b""
    while True:
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace") + "\n"
            print("[jobd] " + line, end="", flush=True)
            log.append(line)
            m = re.search(r"listening address=\S*:(\d+)", line)
            if m:
                if buf:
                    log.append(buf.decode(errors="replace"))
                return int(m.group(1))
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise SystemExit("jobd did not start listening within 20 s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("jobd exited early:\n" + "".join(log) + buf.decode())
        buf += chunk


def drain(jobd: subprocess.Popen[bytes], log: list[str]) -> None:
    assert jobd.stderr is not None
    for raw in jobd.stderr:
        log.append(raw.decode(errors="replace"))


def drive(pki: Path, port: int, jobd: subprocess.Popen[bytes], log: list[str]) -> int:
    failures = 0

    def jobctl(who: str, *args: str, expect: int = 0) -> str:
        nonlocal failures
        cmd = [str(BIN / "jobctl"), "-c", str(pki / f"{who}.pem"), "-k", str(pki / f"{who}.key"),
               "-C", str(pki / "ca.pem"), "-a", "::1", "-p", str(port), *args]
        print(f"$ jobctl ({who}) {shlex.join(args)}", flush=True)
        result = subprocess.run(cmd, capture_output=True, timeout=60)
        sys.stdout.write(result.stdout.decode(errors="replace"))
        if result.stderr:
            sys.stdout.write("[stderr] " + result.stderr.decode(errors="replace"))
        print(f"[exit {result.returncode}]", flush=True)
        if result.returncode != expect:
            failures += 1
            print(f"!! expected exit {expect}", flush=True)
        return result.stdout.decode()

    say("alice (control) runs a command: its output live, its exit status as jobctl's")
    jobctl("alice", "run", "sh", "-c",
           "for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo done >&2; exit 3", expect=3)
    say("jobs in the background: start, then wait for them (exit status: the first one's)")
    job = jobctl("alice", "start", "sh", "-c", "sleep 0.3; echo built").strip()
    other = jobctl("alice", "start", "--env", "WHO=demo", "sh", "-c", "echo hello $WHO").strip()
    jobctl("alice", "status", job)
    jobctl("alice", "wait", job, other)
    jobctl("alice", "output", "--timestamps", other)
    jobctl("alice", "status", "-v", job)
    say("a long job, stopped with SIGINT, SIGTERM, SIGKILL as needed")
    sleeper = jobctl("alice", "start", "sleep", "600").strip()
    jobctl("alice", "status", sleeper)
    jobctl("alice", "stop", sleeper)
    jobctl("alice", "wait", sleeper, expect=128 + signal.SIGINT)
    say("what alice may see")
    jobctl("alice", "list")
    say("olga (observe) may look but not start")
    jobctl("olga", "list")
    jobctl("olga", "start", "true", expect=1)
    if os.geteuid() == 0 and "cgroups mode=none" not in "".join(log):
        say("limits and isolation: an out-of-memory kill is named; PID 1 of its own namespace")
        jobctl("alice", "run", "--memory", "32M", "python3", "-c",
               "b = bytearray(200 * 1024 * 1024)", expect=128 + signal.SIGKILL)
        jobctl("alice", "run", "--isolate", "pid,net", "sh", "-c",
               "echo my pid is $$; ls /sys/class/net")
    say("stopping jobd with SIGTERM")
    jobd.send_signal(signal.SIGTERM)
    code = jobd.wait(30)
    say("jobd's event log")
    print("".join(log).strip())
    print(f"[jobd exit {code}]")
    if code != 0:
        failures += 1
    say("demo finished: " + ("all steps as expected" if not failures else f"{failures} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
