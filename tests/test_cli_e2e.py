"""End to end: a real jobd process, the real jobctl CLI, trustme certificates.

Covers the rows of SPEC §2 (outputs and exit codes) and §3 (roles)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd

NO_ROLE = "certificate has no role: OU must be one of observe, control, admin"


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout.decode()


def start(jobd: JobdProcess, *argv: str, who: str = "alice") -> int:
    out = ok(jobd.jobctl(who, "start", *argv))
    assert out.endswith("\n") and out.strip().isdigit(), out
    return int(out)


def wait_ended(jobd: JobdProcess, job: int, who: str = "alice") -> str:
    """The job's final status: `stream` returns only when the job has ended."""
    assert jobd.jobctl(who, "stream", str(job)).returncode == 0
    return ok(jobd.jobctl(who, "status", str(job))).strip()


def test_start_stream_output_status(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "printf out1; printf err1 >&2; printf out2")
    result = jobd.jobctl("alice", "stream", str(job))
    assert result.returncode == 0
    assert result.stdout == b"out1out2"
    assert result.stderr == b"err1"
    assert ok(jobd.jobctl("alice", "status", str(job))) == "exited: 0\n"
    result = jobd.jobctl("alice", "output", str(job))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out1out2", b"err1")


def test_ids_in_order_and_arguments_verbatim(jobd: JobdProcess) -> None:
    first = start(jobd, "printf", "%s|", "-la", "--", "a b", "")
    second = start(jobd, "printf", "%s", os.fsdecode(b"\xff\xfe raw"))
    assert second == first + 1
    wait_ended(jobd, first)
    assert jobd.jobctl("alice", "output", str(first)).stdout == b"-la|--|a b||"
    wait_ended(jobd, second)
    assert jobd.jobctl("alice", "output", str(second)).stdout == b"\xff\xfe raw"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sh", "-c", "exit 3"], "exited: 3"),
        (["sh", "-c", "kill -SEGV $$"], "killed: SIGSEGV"),
        (["true"], "exited: 0"),
    ],
)
def test_final_states(jobd: JobdProcess, argv: list[str], expected: str) -> None:
    job = start(jobd, *argv)
    assert wait_ended(jobd, job) == expected


def test_command_not_found(jobd: JobdProcess) -> None:
    result = jobd.jobctl("alice", "start", "nosuchcmd-jobd")
    assert result.returncode == 1
    job = int(result.stdout)
    assert result.stderr == b"error: command not found: nosuchcmd-jobd\n"
    status = ok(jobd.jobctl("alice", "status", str(job)))
    assert status == "error: command not found: nosuchcmd-jobd\n"


def test_stop_running_and_stopped(jobd: JobdProcess) -> None:
    job = start(jobd, "sleep", "1000")
    assert ok(jobd.jobctl("alice", "status", str(job))) == "running\n"
    assert ok(jobd.jobctl("alice", "stop", str(job))) == "process stopped\n"
    assert ok(jobd.jobctl("alice", "status", str(job))) == "stopped\n"
    result = jobd.jobctl("alice", "stop", str(job))
    assert (result.returncode, result.stderr) == (1, b"process not running: stopped\n")
    job = start(jobd, "sh", "-c", "trap '' INT TERM; sleep 1000")
    assert ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job))) == "process stopped\n"
    done = start(jobd, "true")
    wait_ended(jobd, done)
    result = jobd.jobctl("alice", "stop", str(done))
    assert (result.returncode, result.stderr) == (1, b"process not running: exited: 0\n")


def test_not_found_and_delete(jobd: JobdProcess) -> None:
    result = jobd.jobctl("alice", "status", "999")
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"process not found\n")
    job = start(jobd, "sleep", "1000")
    result = jobd.jobctl("alice", "delete", str(job))
    assert result.returncode == 1 and result.stderr.startswith(b"process is running")
    ok(jobd.jobctl("alice", "stop", str(job)))
    assert ok(jobd.jobctl("alice", "delete", str(job))) == ""
    assert jobd.jobctl("alice", "status", str(job)).stderr == b"process not found\n"


def test_live_stream_follows_until_end(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "echo a; sleep 0.3; echo b >&2; sleep 0.3; echo c")
    result = jobd.jobctl("alice", "stream", str(job))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"a\nc\n", b"b\n")


def test_stream_into_closed_pipe_exits_quietly(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "while :; do echo line; done")
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address,
           "-p", str(jobd.port), "stream", str(job)]
    script = 'set -o pipefail; "$@" | head -n 1'
    result = subprocess.run(["bash", "-c", script, "bash", *cmd], capture_output=True,
                            timeout=60, cwd=RUN_CWD)
    assert result.stdout == b"line\n"
    assert result.stderr == b""
    assert result.returncode == 0
    ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job)))


def test_roles(jobd: JobdProcess) -> None:
    mine = start(jobd, "sleep", "1000")
    theirs = start(jobd, "sleep", "1000", who="bob")
    # observe: reads everything, changes nothing
    result = jobd.jobctl("olga", "start", "true")
    assert (result.returncode, result.stderr) == (
        1, b"permission denied: role observe may not start jobs\n")
    assert ok(jobd.jobctl("olga", "status", str(mine))) == "running\n"
    result = jobd.jobctl("olga", "stop", str(mine))
    assert (result.returncode, result.stderr) == (
        1, b"permission denied: role observe may not stop jobs\n")
    result = jobd.jobctl("olga", "delete", str(mine))
    assert (result.returncode, result.stderr) == (
        1, b"permission denied: role observe may not delete jobs\n")
    assert {line.split("\t")[0] for line in ok(jobd.jobctl("olga", "list")).splitlines()} == {
        str(mine), str(theirs)}
    # control: its own jobs only, others look nonexistent
    for command in ("status", "stop", "stream", "output", "delete"):
        result = jobd.jobctl("alice", command, str(theirs))
        assert (result.returncode, result.stderr) == (1, b"process not found\n"), command
    lines = ok(jobd.jobctl("alice", "list")).splitlines()
    # ID, owner, status, created, duration, command (tab-separated: not a terminal)
    assert [line.split("\t")[:3] + line.split("\t")[5:] for line in lines] == [
        [str(mine), "alice", "running", "sleep 1000"]]
    # admin: everyone's
    assert ok(jobd.jobctl("root", "stop", str(theirs))) == "process stopped\n"
    assert ok(jobd.jobctl("root", "stop", str(mine))) == "process stopped\n"
    assert len(ok(jobd.jobctl("root", "list")).splitlines()) == 2
    jobd.wait_for_log(r"request-denied .*who=olga")


@pytest.mark.parametrize(
    ("who", "message"),
    [
        ("norole", NO_ROLE),
        ("wizard", NO_ROLE),
        ("tworoles", "certificate has more than one role"),
        ("nocn", "certificate has no CN"),
    ],
)
def test_identity_refused(jobd: JobdProcess, who: str, message: str) -> None:
    result = jobd.jobctl(who, "list")
    assert result.returncode == 3
    err = result.stderr.decode()
    assert err.startswith("server refused the connection: " + message), err
    assert err.count("\n") == 1
    jobd.wait_for_log(r"identity-refused")


@pytest.mark.parametrize("who", ["stranger", "serveronly"])  # expired, future: jobctl
def test_certificate_refused_at_tls(jobd: JobdProcess, who: str) -> None:  # refuses them
    result = jobd.jobctl(who, "list")
    assert result.returncode == 3
    err = result.stderr.decode()
    assert err.startswith("server refused the connection: "), err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    jobd.wait_for_log(r"connection-refused")


def test_server_certificate_checked(jobd: JobdProcess) -> None:
    pki = jobd.pki
    result = jobd.jobctl("alice", "list", extra=["-C", pki.path("other-ca.pem")])
    assert result.returncode == 3
    assert result.stderr.decode().startswith("TLS handshake failed: certificate verify failed")
    result = jobd.jobctl("alice", "list", extra=["--server-name", "wrong.example"])
    assert result.returncode == 3
    assert result.stderr.decode().startswith("TLS handshake failed: certificate verify failed")
    # the right name given explicitly works
    assert jobd.jobctl("alice", "list", extra=["--server-name", "localhost"]).returncode == 0


def test_tls12_and_no_certificate_refused(jobd: JobdProcess) -> None:
    import ssl

    pki = jobd.pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki.path("ca.pem"))
    ctx.load_cert_chain(pki.path("alice.pem"), pki.path("alice.key"))
    with socket.create_connection((jobd.address, jobd.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.path("ca.pem"))
    with socket.create_connection((jobd.address, jobd.port), timeout=10) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        # TLS 1.3: the client's handshake completes; the refusal arrives on read.
        tls.sendall(b"\x00\x00\x00\x01\x80")
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            tls.recv(1024)
    jobd.wait_for_log(r"connection-refused .*reason=")


def test_cannot_connect(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*JOBCTL, *pki.client_args("alice"), "-a", "127.0.0.1", "-p", str(port),
           "list"]
    result = subprocess.run(cmd, capture_output=True, timeout=60, cwd=RUN_CWD)
    assert result.returncode == 3
    assert result.stderr == f"cannot connect to 127.0.0.1:{port}: connection refused\n".encode()


def test_usage_errors(jobd: JobdProcess) -> None:
    for args in (["start"], ["frobnicate"], []):
        result = jobd.jobctl("alice", *args)
        assert result.returncode == 2, args
        assert b"usage:" in result.stderr and b"Traceback" not in result.stderr
    # a bad value: one line (issue 14)
    result = jobd.jobctl("alice", "status", "abc")
    assert (result.returncode, result.stderr) == (
        2, b"jobctl status: error: argument ID: not a job ID: 'abc'\n")
    result = jobd.jobctl("alice", "list", extra=["-k", "/nonexistent/key.pem"])
    assert result.returncode == 2
    assert result.stderr == b"cannot read key /nonexistent/key.pem: no such file\n"


def test_environment_defaults(jobd: JobdProcess, tmp_path: Path) -> None:
    pki = jobd.pki
    env = dict(os.environ, JOBCTL_CERTIFICATE=pki.path("alice.pem"),
               JOBCTL_KEY=pki.path("alice.key"), JOBCTL_CA=pki.path("ca.pem"),
               JOBCTL_ADDRESS=jobd.address, JOBCTL_PORT=str(jobd.port),
               JOBCTL_SERVER_NAME="localhost")
    cmd = [*JOBCTL, "start", "true"]
    result = subprocess.run(cmd, capture_output=True, timeout=60, cwd=RUN_CWD, env=env)
    assert result.returncode == 0, result.stderr
    # the certificate directory: $XDG_CONFIG_HOME/jobctl/{certificate,key,ca}.pem
    conf = tmp_path / "config" / "jobctl"
    conf.mkdir(parents=True)
    for src, dst in (("alice.pem", "certificate.pem"), ("alice.key", "key.pem"),
                     ("ca.pem", "ca.pem")):
        (conf / dst).write_bytes(Path(pki.path(src)).read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), JOBCTL_PORT=str(jobd.port),
               JOBCTL_ADDRESS=jobd.address)
    result = subprocess.run([*JOBCTL, "list"], capture_output=True, timeout=60,
                            cwd=RUN_CWD, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("1\talice\t")


def test_json_output(jobd: JobdProcess) -> None:
    started = json.loads(ok(jobd.jobctl("alice", "--json", "start", "sleep", "1000")))
    assert started["state"] == "running" and started["owner"] == "alice"
    assert started["argv"] == ["sleep", "1000"] and isinstance(started["pid"], int)
    job = started["id"]
    status = json.loads(ok(jobd.jobctl("alice", "--json", "status", str(job))))
    assert status["status"] == "running"
    stopped = json.loads(ok(jobd.jobctl("alice", "--json", "stop", str(job))))
    assert stopped["state"] == "stopped" and stopped["ended"] >= stopped["started"]
    listing = json.loads(ok(jobd.jobctl("alice", "--json", "list")))
    assert [j["id"] for j in listing["jobs"]] == [job]
    assert json.loads(ok(jobd.jobctl("alice", "--json", "delete", str(job)))) == {"deleted": job}


def test_output_cap_reported(pki: Pki, tmp_path: Path) -> None:
    server = start_jobd(pki, tmp_path / "state", "--output-cap", "1K")
    try:
        job = start(server, "head", "-c", "10000", "/dev/zero")
        result = server.jobctl("alice", "stream", str(job))
        assert result.returncode == 0
        assert result.stdout == b"\0" * 1024
        assert result.stderr == b"jobctl: output truncated: 8976 bytes dropped by the server\n"
    finally:
        assert server.stop() == 0


def test_sigterm_ends_streams_and_stops_jobs(pki: Pki, tmp_path: Path) -> None:
    server = start_jobd(pki, tmp_path / "state")
    try:
        job = start(server, "sh", "-c", "echo started; exec sleep 1000")
        cmd = [*JOBCTL, *pki.client_args("alice"), "-a", server.address,
               "-p", str(server.port), "stream", str(job)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=RUN_CWD) as streamer:
            assert streamer.stdout is not None
            assert streamer.stdout.readline() == b"started\n"
            assert server.stop() == 0
            _out, err = streamer.communicate(timeout=30)
            assert streamer.returncode == 0, err
        server.wait_for_log(r"info stopped")
    finally:
        server.stop()
    # the record survives, stopped
    server = start_jobd(pki, tmp_path / "state")
    try:
        assert ok(server.jobctl("alice", "status", str(job))) == "stopped\n"
        assert server.jobctl("alice", "output", str(job)).stdout == b"started\n"
        assert start(server, "true") == job + 1
    finally:
        assert server.stop() == 0


def test_event_log_lines(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "exit 0")
    wait_ended(jobd, job)
    jobd.wait_for_log(rf"job-started id={job} owner=alice pid=\d+ argv=\"sh -c 'exit 0'\"")
    jobd.wait_for_log(rf"job-ended id={job} owner=alice status=\"exited: 0\"")
    jobd.jobctl("olga", "start", "true")
    jobd.wait_for_log(r"request-denied who=olga role=observe action=start")
