"""Interactive jobs end to end: the real jobctl on a real terminal (pexpect drives
a pty as a person would) against a real jobd."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import threading
from pathlib import Path

import pexpect
import pytest

from .conftest import JOBCTL, RUN_CWD, JobdProcess

TIMEOUT = 30


def jobctl_line(jobd: JobdProcess, who: str, *args: str) -> str:
    return shlex.join([*JOBCTL, *jobd.pki.client_args(who), "-a", jobd.address,
                       "-p", str(jobd.port), *args])


def terminal(jobd: JobdProcess, who: str, *args: str, rows: int = 30,
             cols: int = 100) -> pexpect.spawn:
    """jobctl on a terminal of its own; afterwards the shell prints the terminal's
    modes (to check they were restored) and jobctl's exit status."""
    line = jobctl_line(jobd, who, *args)
    child = pexpect.spawn("sh", ["-c", f"{line}; echo exit=$?; stty -a"], cwd=str(RUN_CWD),
                          dimensions=(rows, cols), timeout=TIMEOUT,
                          env={**os.environ, "TERM": "xterm-256color"})
    return child


def finish(child: pexpect.spawn, status: int) -> None:
    child.expect(f"exit={status}\r\n")
    child.expect(pexpect.EOF)
    modes = set(child.before.decode().split())
    # Cooked again: canonical mode, echo, signals and output processing, as before.
    assert {"icanon", "echo", "isig", "opost", "icrnl"} <= modes, modes
    child.close()


@pytest.fixture
def cleanup() -> list[pexpect.spawn]:
    children: list[pexpect.spawn] = []
    yield children
    for child in children:
        child.close(force=True)


def test_a_shell_on_a_terminal_resize_ctrl_c_detach_attach_and_an_observer(
        jobd: JobdProcess, cleanup: list[pexpect.spawn]) -> None:
    alice = terminal(jobd, "alice", "run", "-t", "--env", "PS1=$ ", "--",
                     "bash", "--norc", "--noprofile")
    cleanup.append(alice)
    alice.expect(r"attached to job (\d+); Ctrl-\] then d detaches")
    job = alice.match.group(1).decode()
    alice.expect_exact("$ ")  # bash may discard what is typed before its prompt
    alice.send("echo $((6*7))\r")
    alice.expect("\r42\r\n")
    alice.send("stty size; echo $TERM\r")
    alice.expect("30 100\r\nxterm-256color")
    alice.setwinsize(41, 132)  # SIGWINCH to jobctl, which resizes the job's terminal
    alice.send("stty size\r")
    alice.expect("41 132")
    # Ctrl-C interrupts the job's foreground process, not jobctl.
    alice.send("sleep 100; echo not-$((1+1))\r")
    alice.expect(r"sleep 100")
    alice.send("\x03")
    alice.send("echo still-$((2+3))\r")
    alice.expect("still-5")
    assert b"not-2" not in alice.before
    # Detach: the job keeps running; jobctl says how to come back, exits 0.
    alice.send("\x1dd")
    alice.expect(f"detached: job {job} keeps running")
    finish(alice, 0)

    again = terminal(jobd, "alice", "attach", job)
    cleanup.append(again)
    again.expect("detaches")
    observer = terminal(jobd, "olga", "attach", job)
    cleanup.append(observer)
    again.send("echo back-$((3+4))\r")
    again.expect("back-7")
    observer.expect("back-7")  # the same screen
    observer.send("echo nope-$((10+10))\r")  # an observer's keys go nowhere
    again.send("echo marker-$((5+5))\r")
    again.expect("marker-10")
    observer.expect("marker-10")
    assert b"nope-20" not in again.before and b"nope-20" not in observer.before
    again.send("exit 5\r")
    finish(again, 5)
    finish(observer, 5)

    # Replay: stream writes what the terminal showed; --asciicast the same, timed.
    shown = subprocess.run(jobctl_line(jobd, "alice", "stream", job), shell=True,
                           capture_output=True, timeout=TIMEOUT, cwd=RUN_CWD)
    assert shown.returncode == 0 and b"\r42\r\n" in shown.stdout
    assert b"back-7" in shown.stdout and b"nope-20" not in shown.stdout
    cast = subprocess.run(jobctl_line(jobd, "olga", "stream", "--asciicast", job), shell=True,
                          capture_output=True, timeout=TIMEOUT, cwd=RUN_CWD)
    assert cast.returncode == 0, cast.stderr
    header, *events = [json.loads(line) for line in cast.stdout.splitlines()]
    assert header["version"] == 2 and (header["height"], header["width"]) == (30, 100)
    assert header["env"] == {"TERM": "xterm-256color"}
    # Each resize at its place (issue 24): alice's window change, then the size of
    # the second attach's terminal (the observer's is not sent: it cannot type).
    assert {kind for _, kind, _ in events} == {"o", "r"}
    assert [text for _, kind, text in events if kind == "r"] == ["132x41", "100x30"]
    first = next(i for i, (_, kind, _) in enumerate(events) if kind == "r")
    assert "41 132" not in "".join(text for _, kind, text in events[:first] if kind == "o")
    assert "41 132" in "".join(text for _, kind, text in events[first:] if kind == "o")
    times = [t for t, _, _ in events]
    assert times == sorted(times) and times[0] >= 0
    assert "\r42\r\n" in "".join(text for _, _, text in events)


@pytest.mark.timeout(600)  # a GiB through TLS and Python on a loaded 2-core machine
def test_stdin_of_a_gibibyte_arrives_exactly(jobd: JobdProcess, tmp_path: Path) -> None:
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    errors = (tmp_path / "stderr").open("w+b")
    proc = subprocess.Popen([*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address,
                             "-p", str(jobd.port), "run", "-i", "sha256sum"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errors, cwd=RUN_CWD)
    assert proc.stdin is not None

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for i in range(1024):
                data = block[i:] + block[:i]  # every MiB different
                digest.update(data)
                proc.stdin.write(data)
        finally:
            proc.stdin.close()

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()  # until jobctl exits (EOF)
        proc.wait(TIMEOUT)
    finally:
        writer.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    errors.seek(0)
    assert proc.returncode == 0, errors.read()
    assert out.split()[0].decode() == digest.hexdigest()


def test_start_i_then_attach_from_a_pipe(jobd: JobdProcess) -> None:
    started = jobd.jobctl("alice", "start", "-i", "tr", "a-z", "A-Z")
    assert started.returncode == 0, started.stderr
    job = started.stdout.decode().strip()
    attached = subprocess.run([*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address,
                               "-p", str(jobd.port), "attach", "--all", job],
                              input=b"hello\xff\n", capture_output=True, timeout=TIMEOUT,
                              cwd=RUN_CWD)
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"HELLO\xff\n"


def test_attach_refusals_are_one_clear_line(jobd: JobdProcess) -> None:
    plain = jobd.jobctl("alice", "start", "sleep", "100").stdout.decode().strip()
    other = jobd.jobctl("bob", "attach", plain)
    assert other.returncode == 1 and other.stderr == b"process not found\n"
    missing = jobd.jobctl("alice", "attach", "999")
    assert missing.returncode == 1 and missing.stderr == b"process not found\n"
    bad = jobd.jobctl("alice", "run", "-t", "--detach-keys", "ctrl-!!", "true")
    assert bad.returncode == 2 and b"--detach-keys" in bad.stderr and b"Traceback" not in bad.stderr
    jobd.jobctl("alice", "stop", "--grace", "0", plain)


def test_sigterm_restores_the_terminal_and_leaves_the_job_running(
        jobd: JobdProcess, cleanup: list[pexpect.spawn]) -> None:
    child = terminal(jobd, "alice", "run", "-t", "cat")
    cleanup.append(child)
    child.expect(r"attached to job (\d+)")
    job = child.match.group(1).decode()
    child.send("abc")
    child.expect("abc")  # the job's terminal echoes: our terminal is raw, cat is running
    # jobctl is the shell's one child.
    pid = int(subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True,
                             timeout=TIMEOUT).stdout.split()[0])
    os.kill(pid, 15)
    child.expect(f"detached: job {job} keeps running")
    finish(child, 128 + 15)
    status = jobd.jobctl("alice", "status", job)
    assert status.stdout == b"running\n"
    jobd.jobctl("alice", "stop", "--grace", "0", job)
