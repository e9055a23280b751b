"""jobctl round 3 (issue 23): the rough edges a new user hit, labels, rerun, and
picking what to see; end to end against real jobd processes, driving the real CLI."""

from __future__ import annotations

import json
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


def _long(jobd: JobdProcess, job: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (
        line.split(":", 1) for line in ok(jobd.jobctl("alice", "status", "-v", job)).splitlines())}


def test_status_long_of_a_job_without_limits(jobd: JobdProcess, tmp_path: Path) -> None:
    ok(jobd.jobctl("alice", "run", "true"))
    assert re.fullmatch(r"\d\.\ds", _long(jobd, "1")["duration"])  # 0.0s, not 0s
    flag = tmp_path / "go"
    job = ok(jobd.jobctl("alice", "start", "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; "
                         "done; head -c 30000000 /dev/zero | tail -c 1 | wc -c")).strip()
    # Once it is in its cgroup (moved in just after it started), it is measured.
    deadline = time.monotonic() + DEADLINE
    while _long(jobd, job)["cpu time"] == "-":
        assert time.monotonic() < deadline, "never measured"
    flag.touch()
    assert ok(jobd.jobctl("alice", "wait", job)) == "exited: 0\n"
    fields = _long(jobd, job)
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


# -- 15. labels --------------------------------------------------------------------------


def test_labels_on_start_status_and_list(jobd: JobdProcess) -> None:
    one = ok(jobd.jobctl("alice", "start", "--label", "env=prod", "--label", "team=web",
                         "true")).strip()
    two = ok(jobd.jobctl("alice", "start", "--label", "env=test", "true")).strip()
    ok(jobd.jobctl("alice", "start", "true"))
    long = ok(jobd.jobctl("alice", "status", "-v", one))
    assert "labels:      env=prod,team=web" in long, long
    rows = [line.split("\t") for line in ok(jobd.jobctl("alice", "list")).splitlines()]
    assert [r[6] for r in rows] == ["env=prod,team=web", "env=test", "-"]
    # Filtered by the server; several --label: every one must match.
    assert ok(jobd.jobctl("alice", "list", "-q", "--label", "env=prod")) == f"{one}\n"
    assert ok(jobd.jobctl("alice", "list", "-q", "--label", "env=test")) == f"{two}\n"
    assert ok(jobd.jobctl("alice", "list", "-q", "--label", "env=prod",
                          "--label", "team=db")) == ""
    listed = json.loads(ok(jobd.jobctl("alice", "--json", "list", "--label", "team=web")))
    assert [j["labels"] for j in listed["jobs"]] == [{"env": "prod", "team": "web"}]
    # Another control user sees none of alice's jobs, labels or not.
    assert ok(jobd.jobctl("bob", "list", "--label", "env=prod")) == ""


@pytest.mark.parametrize(("args", "fragment"), [
    (["--label", "noequals"], "argument --label: expected KEY=VALUE: 'noequals'"),
    (["--label", ".bad=1"], "argument --label: label key '.bad' must be 1 to 128"),
    (["--label", "k=" + "v" * 513], "a value of 513 bytes is longer than 512"),
    (["--label", "k=a\x1bb"], "the value has control characters"),
    (["--label", "k=1", "--label", "k=2"], "argument --label: label 'k' repeats"),
    ([arg for i in range(33) for arg in ("--label", f"k{i}=v")],
     "argument --label: 33 labels, more than 32"),
])
def test_bad_labels_are_refused_before_anything_is_sent(jobd: JobdProcess, args: list[str],
                                                        fragment: str) -> None:
    one_line(jobd.jobctl("alice", "start", *args, "true"), fragment)
    assert ok(jobd.jobctl("alice", "list")) == ""


async def test_labels_and_rerun_need_a_server_of_1_2(pki: Pki, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.1 server would ignore labels: the client refuses, naming the version."""
    import trio

    import protocol

    from .test_client_lib import running_server

    monkeypatch.setattr(protocol, "PROTOCOL_MINOR", 1)
    async with running_server(pki, tmp_path / "state") as server:
        def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [*JOBCTL, *pki.client_args("alice"), "-a", "127.0.0.1", "-p", str(server.port),
                 "--server-name", "localhost", *args], capture_output=True, timeout=DEADLINE,
                cwd=RUN_CWD, stdin=subprocess.DEVNULL)

        started = await trio.to_thread.run_sync(cli, "start", "--label", "a=b", "true")
        one_line(started, "the server does not support labels: it speaks protocol 1.1, "
                 "labels needs 1.2 (a newer jobd)")
        listed = await trio.to_thread.run_sync(cli, "list", "--label", "a=b")
        one_line(listed, "labels needs 1.2")
        rerun = await trio.to_thread.run_sync(cli, "rerun", "1")
        one_line(rerun, "rerun needs 1.2")
        plain = await trio.to_thread.run_sync(cli, "list")
        assert plain.returncode == 0 and plain.stdout == b""  # nothing was started


# -- 16. rerun --------------------------------------------------------------------------


def test_rerun_repeats_argv_cwd_env_limits_and_labels(jobd: JobdProcess, tmp_path: Path) -> None:
    first = ok(jobd.jobctl("alice", "run", "--cwd", str(tmp_path), "--env", "GREETING=hi",
                           "--pids", "64", "--label", "kind=demo", "sh", "-c",
                           'echo "$GREETING from $(pwd)"'))
    assert first == f"hi from {tmp_path}\n"
    again = ok(jobd.jobctl("alice", "rerun", "1")).strip()
    assert again == "2"
    assert ok(jobd.jobctl("alice", "wait", again)) == "exited: 0\n"
    assert ok(jobd.jobctl("alice", "output", again)) == first
    old, new = (json.loads(ok(jobd.jobctl("alice", "--json", "status", i))) for i in ("1", "2"))
    for key in ("argv", "limits", "labels", "owner"):
        assert new[key] == old[key], key
    # Not another's job (control: own jobs only; the same not-found as for any job)...
    refused = jobd.jobctl("bob", "rerun", "1")
    one_line(refused, "process not found", status=1)
    # ...but an admin's any; the new job is the admin's.
    by_root = ok(jobd.jobctl("root", "rerun", "1")).strip()
    assert json.loads(ok(jobd.jobctl("root", "--json", "status", by_root)))["owner"] == "root"
    # An observer may not start jobs at all.
    one_line(jobd.jobctl("olga", "rerun", "1"), "permission denied", status=1)
    one_line(jobd.jobctl("alice", "rerun", "99"), "process not found", status=1)


# -- 17. pick what to see ---------------------------------------------------------------


def test_list_quiet_and_format(jobd: JobdProcess) -> None:
    ids = [ok(jobd.jobctl("alice", "start", "--label", "n=1", "true")).strip() for _ in range(3)]
    assert ok(jobd.jobctl("alice", "list", "-q")).split() == ids
    rows = ok(jobd.jobctl("alice", "list", "--format", "id,state,labels")).splitlines()
    assert [r.split("\t")[0] for r in rows] == ids
    assert all(r.split("\t")[2] == "n=1" and len(r.split("\t")) == 3 for r in rows)
    one_line(jobd.jobctl("alice", "list", "--format", "id,nope"),
             "argument --format: unknown column 'nope' (columns: id, owner,")
    assert jobd.jobctl("alice", "list", "-q", "--format", "id").returncode == 2


def test_stream_one_fd_and_since(jobd: JobdProcess, tmp_path: Path,
                                 procs: list[subprocess.Popen[bytes]]) -> None:
    flag = tmp_path / "go"
    job = ok(jobd.jobctl("alice", "start", "sh", "-c",
                         f"echo out1; echo err1 >&2; while [ ! -e {flag} ]; do sleep 0.05; done; "
                         "echo out2; echo err2 >&2")).strip()
    follower = popen(jobd, "stream", job)
    procs.append(follower)
    assert follower.stdout is not None and follower.stderr is not None
    read_until(follower.stdout.fileno(), b"out1\n")  # both first lines are in jobd's log
    read_until(follower.stderr.fileno(), b"err1\n")
    cut = time.time()
    flag.touch()
    assert ok(jobd.jobctl("alice", "wait", job)) == "exited: 0\n"
    out = jobd.jobctl("alice", "stream", "--stdout", job)
    assert out.stdout == b"out1\nout2\n" and out.stderr == b""
    err = jobd.jobctl("alice", "stream", "--stderr", job)
    assert err.stdout == b"" and err.stderr == b"err1\nerr2\n"
    late = jobd.jobctl("alice", "stream", "--since", _rfc3339(cut), job)
    assert (late.stdout, late.stderr) == (b"out2\n", b"err2\n"), late
    recent = jobd.jobctl("alice", "output", "--since", "1h", "--stderr", job)
    assert (recent.stdout, recent.stderr) == (b"", b"err1\nerr2\n")
    one_line(jobd.jobctl("alice", "stream", "--since", "yesterday", job),
             "argument --since: not a duration or an RFC 3339 time: 'yesterday'")


def _rfc3339(when: float) -> str:
    micros = round(when * 1e6)
    secs, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"
