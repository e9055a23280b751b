"""jobctl round 3 (issue 23): the rough edges a new user hit, labels, rerun, and
picking what to see; end to end against real jobd processes, driving the real CLI."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd

#: Generous bound for a whole CLI interaction on a loaded machine.
DEADLINE = 60.0


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout.decode()


def one_line(result: subprocess.CompletedProcess[bytes], fragment: str, status: int = 2) -> str:
    """A refusal: ``status``, one line on stderr holding ``fragment``, no traceback."""
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err)
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    return err


def read_until(fd: int, marker: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, seen
        chunk = os.read(fd, 4096)
        assert chunk, seen
        seen += chunk
    return seen


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def popen(jobd: JobdProcess, *args: str, who: str = "alice",
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args(who), "-a", jobd.address, "-p", str(jobd.port), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                            cwd=RUN_CWD)


# -- 4. run when jobd shuts down ------------------------------------------------------


def test_run_says_the_server_shut_down(pki: Pki, tmp_path: Path,
                                       procs: list[subprocess.Popen[bytes]]) -> None:
    server = start_jobd(pki, tmp_path / "state")
    try:
        proc = popen(server, "run", "sh", "-c", "echo ready; exec sleep 1000")
        procs.append(proc)
        assert proc.stdout is not None
        read_until(proc.stdout.fileno(), b"ready\n")
        server.proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 128 + signal.SIGINT, err  # the stop sequence's first step
        assert err == b"jobctl: job 1 stopped: the server is shutting down\n"
    finally:
        server.stop()


def test_run_says_another_client_stopped_it(jobd: JobdProcess,
                                            procs: list[subprocess.Popen[bytes]]) -> None:
    proc = popen(jobd, "run", "sh", "-c", "echo ready; exec sleep 1000")
    procs.append(proc)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"ready\n")
    ok(jobd.jobctl("alice", "stop", "1"))
    _, err = proc.communicate(timeout=DEADLINE)
    assert err == b"jobctl: job 1 stopped (by a stop request)\n"


# -- 7, 8, 10. bad values: one style, one line ----------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--memory", "99999999T", "true"],
     "jobctl run: error: argument --memory: must be at most 9223372036854775807 bytes: "
     "'99999999T'"),
    (["run", "--memory", "-1", "true"], "jobctl run: error: argument --memory: must be "
     "positive: '-1'"),
    (["run", "--cpus", "0", "true"], "jobctl run: error: argument --cpus: must be a finite "
     "positive number: '0'"),
    (["start", "--pids", "0", "true"], "jobctl start: error: argument --pids: must be "
     "positive: '0'"),
    # 8: a forgotten unit
    (["run", "--memory", "1", "true"], "jobctl run: error: argument --memory: must be at "
     "least 1M: '1' is 1 byte (did you mean 1G?)"),
    (["run", "--memory", "512K", "true"], "(did you mean 512M?)"),
    # 10: what was wrong, not a misleading reason
    (["stream", "--tail", "99999999999999999999", "1"],
     "jobctl stream: error: argument --tail: must be at most 1000000000 lines: "),
    (["wait", "--timeout", "1e309", "1"],
     "jobctl wait: error: argument --timeout: must be at most 604800 seconds: '1e309'"),
    (["prune", "--older-than", "-5s"],
     "jobctl prune: error: argument --older-than: must not be negative: '-5s'"),
])
def test_bad_values_are_one_line_in_one_style(jobd: JobdProcess, args: list[str],
                                              message: str) -> None:
    one_line(jobd.jobctl("alice", *args), message)
    assert ok(jobd.jobctl("alice", "list")) == ""  # nothing started


def test_a_key_given_as_the_certificate_is_named(jobd: JobdProcess) -> None:
    pki = jobd.pki
    swapped = jobd.jobctl("alice", "list", extra=["-c", pki.path("alice.key")])
    one_line(swapped, f"{pki.path('alice.key')} holds a private key, not a certificate "
             "(certificate and key swapped?)")
    swapped = jobd.jobctl("alice", "list", extra=["-k", pki.path("alice.pem")])
    one_line(swapped, f"{pki.path('alice.pem')} holds a certificate, not a private key")


def test_jobd_names_a_key_given_as_its_certificate(pki: Pki, tmp_path: Path) -> None:
    from .conftest import JOBD

    result = subprocess.run([*JOBD, "-c", pki.path("server.key"), "-k", pki.path("server.key"),
                             "-C", pki.path("ca.pem"), "-p", "0", "--state-dir",
                             str(tmp_path / "state")], capture_output=True, timeout=DEADLINE,
                            cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert b"holds a private key, not a certificate" in result.stderr, result.stderr


def test_ca_sign_of_a_server_request_hints_server(tmp_path: Path) -> None:
    from .conftest import JOBD

    def jobd(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*JOBD, *args], capture_output=True, timeout=DEADLINE,
                              cwd=tmp_path, stdin=subprocess.DEVNULL)

    assert jobd("ca", "init", str(tmp_path / "ca")).returncode == 0
    made = jobd("cert", "request", "--name", "web1", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    signed = jobd("ca", "sign", "--ca", str(tmp_path / "ca"), str(tmp_path / "web1.csr"))
    assert signed.returncode == 1
    assert b"sign with --server --san NAME" in signed.stderr, signed.stderr


# -- 9, 11. usage -----------------------------------------------------------------------


def test_unknown_option_gets_the_subcommands_usage_and_a_hint(jobd: JobdProcess) -> None:
    result = jobd.jobctl("alice", "stream", "--tial", "3", "1")
    assert result.returncode == 2
    *usage, last = result.stderr.decode().splitlines()
    assert usage[0].startswith("usage: jobctl stream ")
    assert last == ("jobctl stream: error: unrecognized arguments: --tial 1 "
                    "(--tial: did you mean --tail?)")
    started = jobd.jobctl("alice", "start", "--mem", "1G", "true")
    assert started.returncode == 2 and b"did you mean --memory?" in started.stderr
    job = ok(jobd.jobctl("alice", "start", "true")).strip()
    assert ok(jobd.jobctl("alice", "status", "--verbose", job)).startswith("id:")


def test_no_arguments_print_the_help_and_cert_is_listed() -> None:
    result = subprocess.run(JOBCTL, capture_output=True, timeout=DEADLINE, cwd=RUN_CWD,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stderr == b""
    out = result.stdout.decode()
    assert out.startswith("usage: jobctl ") and "Control jobs on a jobd server." in out
    assert "    cert " in out
    helped = subprocess.run([*JOBCTL, "-h"], capture_output=True, timeout=DEADLINE,
                            cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    assert "    cert " in helped.stdout.decode()


# -- 12. status -v measures every job --------------------------------------------------


def test_status_long_of_a_short_job_without_limits(jobd: JobdProcess, tmp_path: Path) -> None:
    ok(jobd.jobctl("alice", "run", "sh", "-c", "head -c 3000000 /dev/zero | wc -c"))
    fields = dict(line.split(":", 1) for line in ok(jobd.jobctl("alice", "status", "-v", "1"))
                  .splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert re.fullmatch(r"\d\.\ds", fields["duration"]), fields  # 0.3s, not 0s
    assert fields["limits"] == "none"
    assert fields["peak memory"] != "-" and fields["cpu time"] != "-", fields


# -- 13. an inherited "ignore SIGINT" is kept ------------------------------------------


def test_run_keeps_an_inherited_sigint_ignore(jobd: JobdProcess, tmp_path: Path,
                                              procs: list[subprocess.Popen[bytes]]) -> None:
    flag = tmp_path / "go"
    words = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p", str(jobd.port),
             "run", "sh", "-c", f"echo ready; while [ ! -e {flag} ]; do sleep 0.05; done; exit 7"]
    script = "trap '' INT; exec " + " ".join(f"'{w}'" for w in words)
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=RUN_CWD)
    procs.append(proc)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"ready\n")
    proc.send_signal(signal.SIGINT)  # ignored: discarded as it is sent
    flag.touch()
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 7, err  # followed to the job's own end
    assert b"detached" not in err
