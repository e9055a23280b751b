"""jobctl for people and for scripts (issue 14, and issue 13's escaping on the
CLI side): end to end against a real jobd, driving the real CLI."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki

#: Generous bound for a whole CLI interaction on a loaded machine.
DEADLINE = 60.0


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout.decode()


def usage_error(result: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert fragment.encode() in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr
    # argparse's usage, then one error line
    *usage, last = result.stderr.decode().splitlines()
    assert "error: " in last and fragment in last, result.stderr
    assert usage[0].startswith("usage: jobctl") and all(u.startswith(" ") for u in usage[1:])


def bad_value(result: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    """A bad number or value: exit 2 and one line, no usage, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.decode()
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err


def start(jobd: JobdProcess, *argv: str, who: str = "alice") -> int:
    return int(ok(jobd.jobctl(who, "start", *argv)))


def jobs_of(jobd: JobdProcess, who: str = "alice") -> list[str]:
    return ok(jobd.jobctl(who, "list")).splitlines()


# -- mistakes never start jobs --------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_start_help_prints_help_and_starts_nothing(jobd: JobdProcess, flag: str) -> None:
    for command in ("start", "run"):
        result = jobd.jobctl("alice", command, flag)
        out = ok(result)
        assert out.startswith(f"usage: jobctl {command} ")
        assert "example:" in out and "--memory" in out
    assert jobs_of(jobd) == []


def test_unknown_start_option_is_a_usage_error(jobd: JobdProcess) -> None:
    usage_error(jobd.jobctl("alice", "start", "--mem", "64M", "true"),
                "unrecognized arguments: --mem")
    usage_error(jobd.jobctl("alice", "run", "--bogus", "true"), "unrecognized arguments: --bogus")
    usage_error(jobd.jobctl("alice", "start"), "missing command")
    assert jobs_of(jobd) == []
    # `--` passes everything after it through, options and all.
    job = start(jobd, "--", "sh", "-c", 'printf "%s|" "$0" "$@"', "--mem", "-la")
    ok(jobd.jobctl("alice", "wait", str(job)))
    assert jobd.jobctl("alice", "output", str(job)).stdout == b"--mem|-la|"  # $0 is --mem


def test_global_options_after_the_subcommand(jobd: JobdProcess) -> None:
    # The port before it is wrong; the one after the subcommand wins.
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "start",
           "-p", str(jobd.port), "true"]
    result = subprocess.run(cmd, capture_output=True, timeout=DEADLINE, cwd=RUN_CWD,
                            stdin=subprocess.DEVNULL)
    job = int(ok(result))
    ok(jobd.jobctl("alice", "wait", str(job)))
    status = json.loads(ok(jobd.jobctl("alice", "status", str(job), "--json")))
    assert status["status"] == "exited: 0"
    listing = json.loads(ok(jobd.jobctl("alice", "list", "--json")))
    assert [j["id"] for j in listing["jobs"]] == [job]
    # After start's command, the options belong to the job.
    job = start(jobd, "printf", "%s ", "--json", "-p", "1")
    ok(jobd.jobctl("alice", "wait", str(job)))
    assert jobd.jobctl("alice", "output", str(job)).stdout == b"--json -p 1 "


def test_bad_numbers_never_trace_back(jobd: JobdProcess) -> None:
    job = start(jobd, "sleep", "1000")
    bad_value(jobd.jobctl("alice", "status", "99999999999999999999"), "not a job ID")
    bad_value(jobd.jobctl("alice", "status", "-3"), "not a job ID")
    for grace in ("-1", "nan", "1e308", "inf", "x"):
        bad_value(jobd.jobctl("alice", "stop", "--grace", grace, str(job)), "--grace")
    # None of these sent a stop.
    assert ok(jobd.jobctl("alice", "status", str(job))) == "running\n"
    for args, fragment in (
            (["list", "--since", "soon"], "not a duration"),
            (["wait", "--timeout", "-1", str(job)], "--timeout"),
            (["stream", "--tail", "many", str(job)], "not a number of lines"),
            (["start", "--memory", "99999999999999999999999T", "true"],
             "argument --memory: must be at most 9223372036854775807 bytes: "),
            (["start", "--memory", "0", "true"], "argument --memory: must be positive: '0'"),
            (["start", "--cpus", "nan", "true"],
             "argument --cpus: must be a finite positive number: 'nan'"),
            (["run", "--pids", "-1", "true"], "argument --pids: not a whole number: '-1'"),
            (["run", "--pids", "0", "true"], "argument --pids: must be positive: '0'"),
            (["start", "--env", "NOEQUALS", "true"], "expected NAME=VALUE")):
        bad_value(jobd.jobctl("alice", *args), fragment)
    usage_error(jobd.jobctl("alice", "list", "--state", "sleepy"), "invalid choice")
    assert ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job))) == "process stopped\n"


def test_missing_certificate_message(jobd: JobdProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # no default files there
    cmd = [*JOBCTL, "-c", jobd.pki.path("alice.pem"), "-k", jobd.pki.path("alice.key"),
           "-a", jobd.address, "-p", str(jobd.port), "list"]
    result = subprocess.run(cmd, capture_output=True, timeout=DEADLINE, cwd=RUN_CWD, env=env,
                            stdin=subprocess.DEVNULL)
    # No CA anywhere: trust on first use (issue 15), which without a terminal and
    # without --trust-on-first-use refuses, naming the fingerprint and the options.
    assert result.returncode == 3
    err = result.stderr.decode()
    assert err.count("\n") == 1
    assert "not known (no CA certificate: -C/--certificate-authority, JOBCTL_CA or " \
        f"{tmp_path}/jobctl/ca.pem" in err
    assert "SHA256 fingerprint is " in err and "--trust-on-first-use" in err


def test_ca_directory_is_named(jobd: JobdProcess, tmp_path: Path) -> None:
    result = jobd.jobctl("alice", "list", extra=["-C", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr == (f"-C/--certificate-authority: {tmp_path} is a directory, "
                             "not a CA certificate file\n").encode()


def test_address_with_port(pki: Pki, tmp_path: Path) -> None:
    from .conftest import start_jobd

    server = start_jobd(pki, tmp_path / "state", address="::1")
    try:
        for address in (f"[::1]:{server.port}", f"localhost:{server.port}"):
            cmd = [*JOBCTL, *pki.client_args("alice"), "-a", address, "list"]
            result = subprocess.run(cmd, capture_output=True, timeout=DEADLINE, cwd=RUN_CWD,
                                    stdin=subprocess.DEVNULL, env=_no_jobctl_env())
            if address.startswith("localhost") and result.returncode == 3:
                continue  # localhost may resolve to 127.0.0.1 only; ::1 is what is served
            assert result.returncode == 0, (address, result.stderr)
        cmd = [*JOBCTL, *pki.client_args("alice"), "-a", f"[::1]:{server.port}", "-p", "1",
               "list"]
        result = subprocess.run(cmd, capture_output=True, timeout=DEADLINE, cwd=RUN_CWD,
                                stdin=subprocess.DEVNULL, env=_no_jobctl_env())
        assert result.returncode == 2
        assert b"-a/--address says port" in result.stderr
    finally:
        server.stop()


def _no_jobctl_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}


def test_every_subcommand_help_has_a_description_and_an_example(jobd: JobdProcess) -> None:
    top = ok(jobd.jobctl("alice", "--help"))
    names = re.findall(r"^    (\w+) ", top, re.M)
    assert {"run", "start", "wait", "status", "stream", "output", "stop", "list", "delete",
            "completion"} <= set(names)
    for name in names:
        out = ok(jobd.jobctl("alice", name, "-h"))
        body = out.split("\n\n")
        assert out.startswith(f"usage: jobctl {name}"), name
        assert len(body[1].strip()) > 30, (name, body[1])  # a description
        assert f"example:\n  jobctl {name}" in out or "example:\n  source <(jobctl" in out, name


# -- run -------------------------------------------------------------------------


def test_run_streams_and_exits_with_the_jobs_status(jobd: JobdProcess) -> None:
    result = jobd.jobctl("alice", "run", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    result = jobd.jobctl("alice", "run", "sh", "-c", "kill -TERM $$")
    assert (result.returncode, result.stderr) == (128 + signal.SIGTERM, b"killed: SIGTERM\n")
    result = jobd.jobctl("alice", "run", "nosuchcmd-jobd")
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr == b"error: command not found: nosuchcmd-jobd\n"
    assert ok(jobd.jobctl("alice", "run", "true")) == ""


def test_run_with_cwd_env_and_clear_env(jobd: JobdProcess, tmp_path: Path) -> None:
    out = ok(jobd.jobctl("alice", "run", "--cwd", str(tmp_path), "--env", "GREETING=hi there",
                         "--env", "X=1=2", "sh", "-c", 'echo "$PWD|$GREETING|$X|${PATH:+path}"'))
    assert out == f"{tmp_path}|hi there|1=2|path\n"
    # --clear-env: only what --env gives (no PATH: the command needs a full path).
    out = ok(jobd.jobctl("alice", "run", "--clear-env", "--env", "ONLY=1", "/usr/bin/env"))
    assert out == "ONLY=1\n"
    out = ok(jobd.jobctl("alice", "run", "--clear-env", "/usr/bin/env"))
    assert out == ""


def _interrupt_when_ready(proc: subprocess.Popen[bytes], marker: bytes,
                          read_fd: int) -> bytes:
    """Read proc's output (on read_fd) until marker, then send it SIGINT."""
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in seen:
        ready, _, _ = select.select([read_fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, seen
        chunk = os.read(read_fd, 4096)
        assert chunk, seen
        seen += chunk
    proc.send_signal(signal.SIGINT)
    return seen


def _run(jobd: JobdProcess, *args: str, stdin: int | None = subprocess.DEVNULL
         ) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p", str(jobd.port),
           "run", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                            cwd=RUN_CWD)


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


def test_run_interrupted_in_a_script_detaches(jobd: JobdProcess,
                                              procs: list[subprocess.Popen[bytes]]) -> None:
    proc = _run(jobd, "sh", "-c", "echo ready; exec sleep 1000")
    procs.append(proc)
    assert proc.stdout is not None
    _interrupt_when_ready(proc, b"ready\n", proc.stdout.fileno())
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130
    m = re.search(rb"detached: job (\d+) keeps running", err)
    assert m, err
    assert ok(jobd.jobctl("alice", "status", m.group(1).decode())) == "running\n"
    ok(jobd.jobctl("alice", "stop", "--grace", "0", m.group(1).decode()))


def test_run_stop_on_interrupt(jobd: JobdProcess, procs: list[subprocess.Popen[bytes]]) -> None:
    proc = _run(jobd, "--stop-on-interrupt", "sh", "-c", "echo ready; exec sleep 1000")
    procs.append(proc)
    assert proc.stdout is not None
    _interrupt_when_ready(proc, b"ready\n", proc.stdout.fileno())
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 128 + signal.SIGINT, err  # the stop's SIGINT ended it
    assert b"stopping job" in err
    [line] = jobs_of(jobd)
    assert line.split("\t")[2] == "stopped"


def _read_until(fd: int, marker: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, seen
        seen += os.read(fd, 4096)
    return seen


@pytest.mark.parametrize("answer", [b"y\n", b"n\n"])
def test_run_interactive_asks_once(jobd: JobdProcess, procs: list[subprocess.Popen[bytes]],
                                   answer: bytes) -> None:
    """On a terminal, Ctrl-C asks: "y" stops the job; "n" follows on, and a
    second Ctrl-C detaches without asking again."""
    main, secondary = pty.openpty()
    try:
        cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p",
               str(jobd.port), "run", "sh", "-c", "echo ready; exec sleep 1000"]
        proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary,
                                cwd=RUN_CWD)
        procs.append(proc)
        os.close(secondary)
        secondary = -1
        _interrupt_when_ready(proc, b"ready", main)
        _read_until(main, b"[y/N]")
        os.write(main, answer)
        if answer == b"y\n":
            assert proc.wait(DEADLINE) == 128 + signal.SIGINT
            expected = "stopped"
        else:
            _read_until(main, b"following on")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(DEADLINE) == 130
            expected = "running"
    finally:
        os.close(main)
        if secondary >= 0:
            os.close(secondary)
    [line] = jobs_of(jobd)
    assert line.split("\t")[2] == expected
    if expected == "running":
        ok(jobd.jobctl("alice", "stop", "--grace", "0", line.split("\t")[0]))


# -- wait ------------------------------------------------------------------------


def test_wait_prints_statuses_and_exits_with_the_first(jobd: JobdProcess) -> None:
    first = start(jobd, "sh", "-c", "exit 3")
    second = start(jobd, "sh", "-c", "kill -KILL $$")
    result = jobd.jobctl("alice", "wait", str(first), str(second))
    assert (result.returncode, result.stdout) == (3, b"exited: 3\nkilled: SIGKILL\n")
    result = jobd.jobctl("alice", "wait", str(second), str(first))
    assert result.returncode == 128 + signal.SIGKILL
    broken = int(jobd.jobctl("alice", "start", "nosuchcmd-jobd").stdout)
    assert jobd.jobctl("alice", "wait", str(broken)).returncode == 1
    result = jobd.jobctl("alice", "wait", "9999")
    assert (result.returncode, result.stderr) == (1, b"process not found\n")


def test_wait_sends_no_output_and_times_out_with_124(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "yes | head -c 1000000; exec sleep 1000")
    result = jobd.jobctl("alice", "wait", "--timeout", "0.5", str(job))
    assert result.returncode == 124
    assert result.stdout == b""
    assert b"timed out" in result.stderr
    ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job)))
    result = jobd.jobctl("alice", "wait", "--timeout", "30", str(job))
    assert (result.returncode, result.stdout) == (128 + signal.SIGKILL, b"stopped\n")


# -- stream: --tail, --timestamps, --no-follow ------------------------------------


def test_stream_tail_then_follow(jobd: JobdProcess, tmp_path: Path,
                                 procs: list[subprocess.Popen[bytes]]) -> None:
    job = start(jobd, "sh", "-c", "seq 1 100; read x < /dev/null; sleep 0.2; echo after")
    ok(jobd.jobctl("alice", "wait", str(job)))
    assert ok(jobd.jobctl("alice", "stream", "--tail", "3", str(job))) == "99\n100\nafter\n"
    assert ok(jobd.jobctl("alice", "output", "--tail", "1", str(job))) == "after\n"
    assert ok(jobd.jobctl("alice", "stream", "--tail", "0", str(job))) == ""
    assert ok(jobd.jobctl("alice", "stream", "--tail", "1000", str(job))).count("\n") == 101
    # A live job: the tail, then what follows, nothing lost or repeated.
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    live = start(jobd, "sh", "-c", f"seq 1 10; echo ready; read x < {fifo}; echo $x; echo after")
    watcher = _stream(jobd, str(live))
    procs.append(watcher)
    assert watcher.stdout is not None
    _read_until(watcher.stdout.fileno(), b"ready\n")  # in the log now
    tail = _stream(jobd, "--tail", "2", str(live))
    procs.append(tail)
    # Whether the tail was read before or after "more" arrived, what it writes
    # is the last lines of the whole output, each once.
    with open(fifo, "w") as f:
        f.write("more\n")
    out, _ = tail.communicate(timeout=DEADLINE)
    assert tail.returncode == 0
    whole = b"".join(b"%d\n" % i for i in range(1, 11)) + b"ready\nmore\nafter\n"
    assert out in {b"".join(whole.splitlines(keepends=True)[-k:]) for k in (2, 3, 4)}, out


def _stream(jobd: JobdProcess, *args: str) -> subprocess.Popen[bytes]:
    cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p",
           str(jobd.port), "stream", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=RUN_CWD,
                            stdin=subprocess.DEVNULL)


def test_stream_timestamps(jobd: JobdProcess) -> None:
    before = time.time()
    job = start(jobd, "sh", "-c", "printf 'one\\ntw'; sleep 0.1; printf 'o\\nthree\\n'; "
                "echo err >&2")
    ok(jobd.jobctl("alice", "wait", str(job)))
    result = jobd.jobctl("alice", "stream", "--timestamps", str(job))
    lines = result.stdout.decode().splitlines()
    stamp = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})Z "
    assert [re.sub(stamp, "", line) for line in lines] == ["one", "two", "three"]
    for line in lines:
        m = re.match(stamp, line)
        assert m, line
        when = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert before - 2 <= when <= time.time() + 2
    assert re.fullmatch(stamp + "err\n", result.stderr.decode())
    # --no-follow is output: the same bytes, and it returns on a running job.
    assert ok(jobd.jobctl("alice", "stream", "--no-follow", str(job))) == "one\ntwo\nthree\n"
    running = start(jobd, "sh", "-c", "echo hi; exec sleep 1000")
    ok(jobd.jobctl("alice", "stream", "--tail", "1", str(job)))  # (a job that ended)
    assert jobd.jobctl("alice", "stream", "--no-follow", str(running)).returncode == 0
    ok(jobd.jobctl("alice", "stop", "--grace", "0", str(running)))


# -- list and status ----------------------------------------------------------------


def test_list_columns_filters_and_json(jobd: JobdProcess) -> None:
    done = start(jobd, "true")
    ok(jobd.jobctl("alice", "wait", str(done)))
    running = start(jobd, "sleep", "1000")
    bobs = start(jobd, "sleep", "1000", who="bob")
    rows = [line.split("\t") for line in jobs_of(jobd, "root")]
    assert [r[0] for r in rows] == [str(done), str(running), str(bobs)]
    for row in rows:
        assert len(row) == 6
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[3]), row
        assert re.fullmatch(r"\d\.\ds|\d+s|\d+[dh]\d\d[hm]|\d+m\d\ds", row[4]), row

    def ids(*args: str) -> list[int]:
        return [j["id"] for j in json.loads(ok(jobd.jobctl("root", "--json", "list", *args)))[
            "jobs"]]

    assert ids("--state", "running") == [running, bobs]
    assert ids("--state", "ended") == [done]
    assert ids("--state", "exited") == [done]
    assert ids("--owner", "bob") == [bobs]
    assert ids("--since", "1h") == [done, running, bobs]
    assert ids("--owner", "nobody") == []
    created = json.loads(ok(jobd.jobctl("root", "--json", "list")))["jobs"][0]["created"]
    assert isinstance(created, float)  # exact epoch values in JSON
    for job in (running, bobs):
        ok(jobd.jobctl("root", "stop", "--grace", "0", str(job)))


def test_list_header_on_a_terminal(jobd: JobdProcess) -> None:
    start(jobd, "sleep", "1000")
    main, secondary = pty.openpty()
    try:
        cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p",
               str(jobd.port), "list"]
        proc = subprocess.run(cmd, stdout=secondary, stderr=subprocess.PIPE, cwd=RUN_CWD,
                              stdin=subprocess.DEVNULL, timeout=DEADLINE)
        assert proc.returncode == 0
        os.close(secondary)
        secondary = -1
        out = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if secondary >= 0:
            os.close(secondary)
    header, row = out.decode().splitlines()
    assert header.split() == ["ID", "OWNER", "STATUS", "CREATED", "DURATION", "COMMAND"]
    assert header.index("COMMAND") == row.index("sleep 1000")
    assert "\t" not in row


def test_status_long(jobd: JobdProcess) -> None:
    job = start(jobd, "sh", "-c", "echo hi")
    ok(jobd.jobctl("alice", "wait", str(job)))
    out = ok(jobd.jobctl("alice", "status", "-v", str(job)))
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert set(fields) >= {"id", "owner", "command", "status", "pid", "created", "started",
                           "ended", "duration", "limits", "peak memory", "cpu time", "output",
                           "dropped"}
    assert fields["owner"].strip() == "alice"
    assert fields["status"].strip() == "exited: 0"
    assert fields["command"].strip() == "sh -c 'echo hi'"
    assert fields["output"].strip() == "3 bytes kept"
    assert fields["limits"].strip() == "none"
    # aligned: every value starts in the same column
    assert len({len(line) - len(line.split(":", 1)[1].lstrip()) for line in
                out.splitlines()}) == 1
    assert ok(jobd.jobctl("alice", "status", "--long", str(job))) == out


def test_control_characters_are_escaped(pki: Pki, tmp_path: Path) -> None:
    """A CN with a newline, and an argv that would drive the terminal, print as
    one escaped row each; --json keeps the exact values."""
    from .conftest import _write_leaf, client_leaf, start_jobd

    evil_cn = "mallory\n99\troot\trunning\tforged"
    _write_leaf(pki.dir, "mallory", client_leaf(pki.ca, common_name=evil_cn,
                                                organization_unit_name="control"))
    server = start_jobd(pki, tmp_path / "state")
    try:
        argv = ["printf", "\x1b]0;PWNED\x07\x1b[2J\x1b[1;1H\r", "\n2\tforged"]
        job = int(ok(server.jobctl("mallory", "start", *argv)))
        ok(server.jobctl("mallory", "wait", str(job)))
        for who in ("root", "mallory"):
            out = ok(server.jobctl(who, "list"))
            [line] = out.splitlines()
            assert "\x1b" not in out and "\r" not in out and "\x07" not in out
            row = line.split("\t")
            assert row[1] == "mallory\\n99\\troot\\trunning\\tforged"
            assert row[5] == "printf $'\\e]0;PWNED\\a\\e[2J\\e[1;1H\\r' $'\\n2\\tforged'"
        long = ok(server.jobctl("root", "status", "-v", str(job)))
        assert "\x1b" not in long and len(long.splitlines()) == 15  # labels: issue 23
        exact = json.loads(ok(server.jobctl("root", "--json", "list")))["jobs"][0]
        assert exact["owner"] == evil_cn and exact["argv"] == argv
        # The server's error texts echo what the client sent: escaped too.
        result = server.jobctl("mallory", "run", "nosuch\x1b[2J\rcmd")
        assert result.returncode == 1
        assert result.stderr == b"error: command not found: nosuch\\e[2J\\rcmd\n"
        result = server.jobctl("mallory", "start", "nosuch\x1b[2J\rcmd")
        assert result.stderr == b"error: command not found: nosuch\\e[2J\\rcmd\n"
    finally:
        server.stop()


def test_a_long_stop_says_what_it_does_on_a_terminal(
        jobd: JobdProcess, procs: list[subprocess.Popen[bytes]]) -> None:
    job = start(jobd, "sh", "-c", "trap '' INT; echo ready; exec sleep 1000")
    watcher = _stream(jobd, str(job))
    procs.append(watcher)
    assert watcher.stdout is not None
    _read_until(watcher.stdout.fileno(), b"ready\n")  # SIGINT is ignored from now on
    main, secondary = pty.openpty()
    try:
        cmd = [*JOBCTL, *jobd.pki.client_args("alice"), "-a", jobd.address, "-p",
               str(jobd.port), "stop", "--grace", "2", str(job)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=secondary, cwd=RUN_CWD,
                              stdin=subprocess.DEVNULL, timeout=DEADLINE)
        os.close(secondary)
        secondary = -1
        err = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(main)
        if secondary >= 0:
            os.close(secondary)
    assert (proc.returncode, proc.stdout) == (0, b"process stopped\n")
    assert b"SIGINT sent" in err and b"2 s apart" in err
    # Not on a terminal: nothing but the answer.
    job = start(jobd, "sh", "-c", "trap '' INT; exec sleep 1000")
    result = jobd.jobctl("alice", "stop", "--grace", "1", str(job))
    assert (result.stdout, result.stderr) == (b"process stopped\n", b"")


# -- completion ---------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(jobd: JobdProcess, shell: str) -> None:
    script = ok(jobd.jobctl("alice", "completion", shell))
    for word in ("run", "wait", "stop-on-interrupt", "timestamps", "jobctl_job_ids"):
        assert word in script, word
    # Syntax, by the shell itself (.ci/run installs zsh and fish).
    check_cmd = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}
    check = subprocess.run(check_cmd[shell], input=script.encode(), capture_output=True,
                           timeout=DEADLINE)
    assert check.returncode == 0, check.stderr


def _jobctl_on_path(jobd: JobdProcess, tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has `jobctl`: the real one, given the server's
    address and port only on its command line, as a user would type them
    (the certificates come from the environment)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "jobctl"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in JOBCTL) + ' "$@"\n')
    wrapper.chmod(0o755)
    files = jobd.pki.files("alice")
    return {**_no_jobctl_env(), "PATH": f"{bindir}:{os.environ['PATH']}",
            "JOBCTL_CERTIFICATE": files["certificate"], "JOBCTL_KEY": files["key"],
            "JOBCTL_CA": files["ca"]}


def test_bash_completion_completes_job_ids(jobd: JobdProcess, tmp_path: Path) -> None:
    job = start(jobd, "sleep", "1000")
    script = tmp_path / "jobctl.bash"
    script.write_bytes(jobd.jobctl("alice", "completion", "bash").stdout)
    line = f"jobctl -a {jobd.address} -p {jobd.port} status "
    test = (f"source {script}\n"
            f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n"
            "read -ra COMP_WORDS <<< \"$COMP_LINE\"; COMP_WORDS+=(''); "
            "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
            "_shtab_jobctl\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", test], capture_output=True, timeout=DEADLINE,
                            env=_jobctl_on_path(jobd, tmp_path), cwd=RUN_CWD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == [str(job)], result
    ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job)))


def test_fish_completion_completes_job_ids(jobd: JobdProcess, tmp_path: Path) -> None:
    job = start(jobd, "sleep", "1000")
    script = tmp_path / "jobctl.fish"
    script.write_bytes(jobd.jobctl("alice", "completion", "fish").stdout)
    line = f"jobctl -a {jobd.address} -p {jobd.port} stop "
    result = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
                            capture_output=True, timeout=DEADLINE,
                            env=_jobctl_on_path(jobd, tmp_path), cwd=RUN_CWD)
    assert result.returncode == 0, result.stderr
    assert [c.split("\t")[0] for c in result.stdout.decode().splitlines()] == [str(job)], result
    ok(jobd.jobctl("alice", "stop", "--grace", "0", str(job)))


def test_limits_and_sizes_read_as_typed() -> None:
    """status -v's limits line, in the units the options take."""
    from jobctl import _text

    limits = p.Limits(memory=256 << 20, cpus=0.5, pids=64, io_read_bps=(("/dev/sda", 10 << 20),),
                      isolate=("pid", "net"))
    assert _text.limits_text(limits) == ("memory 256M, cpus 0.5, pids 64, "
                                         "io read /dev/sda 10M/s, isolate net,pid")
    assert [_text.size(v) for v in (512, 1536, 1 << 30, 3 << 40)] == ["512B", "1.5K", "1G", "3T"]
    assert [_text.duration(s) for s in (0, 0.3, 9.96, 59, 133, 3725, 93784)] == [
        "0.0s", "0.3s", "9s", "59s", "2m13s", "1h02m", "1d02h"]


def test_every_global_option_with_a_value_is_known_to_the_prescan() -> None:
    """jobctl finds the subcommand before parsing (to build only its parser):
    a global option that takes a value must be listed, or its value would be
    taken for the subcommand."""
    import argparse

    from jobctl import _cli

    parser = _cli.build_parser()
    takes_value = {opt for action in parser._actions if action.option_strings
                   and action.nargs != 0 and not isinstance(action, argparse._VersionAction)
                   for opt in action.option_strings} - {"-h", "--help"}
    assert takes_value == _cli._VALUE_OPTIONS
    assert _cli._selected(["-p", "list", "-a", "x", "status", "3"]) == "status"


def test_run_names_its_job_when_the_connection_is_lost(
        pki: Pki, tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    from .conftest import start_jobd

    server = start_jobd(pki, tmp_path / "state")
    try:
        # Not reconnecting (issue 21): the loss itself is what this test looks at.
        proc = _run(server, "--reconnect-timeout", "0", "sh", "-c", "echo ready; exec sleep 1000")
        procs.append(proc)
        assert proc.stdout is not None
        _read_until(proc.stdout.fileno(), b"ready\n")
        server.proc.kill()
        server.proc.wait()
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 3, err
        assert err.startswith(b"connection")
        assert err.endswith(b" (following job 1: jobctl status 1)\n")
    finally:
        server.stop()
        # A restart on the same state directory kills what the dead jobd left running.
        start_jobd(pki, tmp_path / "state").stop()
