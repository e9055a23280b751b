"""Profiles and fan-out: `jobctl -s GROUP ...` and `jobctl.fanout` across three real
jobd processes on loopback, each with its own port, server certificate and CA."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

import jobctl

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd

NAMES = ("web1", "web2", "web3")


@dataclass
class Fleet:
    servers: dict[str, JobdProcess]
    config: Path
    dir: Path
    down_port: int

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
        env["JOBCTL_CONFIG"] = str(self.config)
        env["XDG_CONFIG_HOME"] = str(self.dir / "xdg")
        env.pop("NO_COLOR", None)
        return env

    def jobctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*JOBCTL, *args], capture_output=True, text=True, timeout=120,
                              cwd=RUN_CWD, env=self.env(), stdin=subprocess.DEVNULL)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    # Clients chain to the shared test CA (jobd -C); each server's own certificate
    # comes from a CA of its own, which only that server's profile trusts.
    (d / "ca.pem").write_bytes(Path(pki.path("ca.pem")).read_bytes())
    servers: dict[str, JobdProcess] = {}
    lines = ['[defaults]', f'certificate = "{pki.path("alice.pem")}"',
             f'key = "{pki.path("alice.key")}"', ""]
    try:
        for name in NAMES:
            own = trustme.CA()
            own.cert_pem.write_to_path(str(d / f"{name}-ca.pem"))
            leaf = own.issue_cert("127.0.0.1", common_name=name)
            leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
            (d / f"{name}.key").chmod(0o600)  # jobd refuses a key others may read
            leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
            fleet_pki = Pki(d, own)
            servers[name] = start_jobd(fleet_pki, d / f"state-{name}", server=name)
            lines += [f"[servers.{name}]", 'address = "127.0.0.1"',
                      f"port = {servers[name].port}", f'ca = "{name}-ca.pem"', ""]
        down = closed_port()
        lines += ["[servers.down]", 'address = "127.0.0.1"', f"port = {down}",
                  'ca = "web1-ca.pem"', "", "[groups]", 'web = ["web1", "web2", "web3"]', ""]
        config = d / "config.toml"
        config.write_text("\n".join(lines))
        yield Fleet(servers, config, d, down)
    finally:
        for server in servers.values():
            server.stop()


def test_run_everywhere_unreachable_reported_at_the_end(fleet: Fleet) -> None:
    result = fleet.jobctl("-s", "all", "run", "uname", "-a")
    assert result.returncode == 3, result.stderr  # the worst: one server unreachable
    out = result.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in out) == list(NAMES)
    for line in out:
        assert line.split(":", 1)[1].strip().startswith("Linux")
    assert "\x1b[" not in result.stdout  # not a terminal: no colors
    assert result.stderr.strip().splitlines() == [
        f"down: cannot connect to 127.0.0.1:{fleet.down_port}: connection refused"]


def test_group_exit_status_is_the_worst_job_status(fleet: Fleet) -> None:
    result = fleet.jobctl("-s", "web", "run", "sh", "-c", "echo out; echo err >&2; exit 5")
    assert result.returncode == 5
    assert sorted(result.stdout.splitlines()) == [f"{n}: out" for n in NAMES]
    assert sorted(result.stderr.splitlines()) == [f"{n}: err" for n in NAMES]
    plain = fleet.jobctl("-s", "web", "--no-prefix", "run", "echo", "x")
    assert plain.returncode == 0 and plain.stdout == "x\nx\nx\n"


def test_start_wait_status_list_stop_on_a_group(fleet: Fleet) -> None:
    started = fleet.jobctl("-s", "web", "start", "sleep", "60")
    assert started.returncode == 0, started.stderr
    ids = dict(line.split(": ") for line in started.stdout.splitlines())
    assert set(ids) == set(NAMES)
    # The same ID on every server only where they are in step; here: ask each its own.
    for name, job in ids.items():
        status = fleet.jobctl("-s", name, "status", job.strip())
        assert status.returncode == 0 and status.stdout == "running\n"
        stopped = fleet.jobctl("-s", name, "stop", "--grace", "0", job.strip())
        assert stopped.stdout == "process stopped\n"
    listed = fleet.jobctl("-s", "web", "--json", "list")
    assert listed.returncode == 0
    objects = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(o["server"] for o in objects) == list(NAMES)
    assert all(o["exit"] == 0 and isinstance(o["jobs"], list) for o in objects)
    job = fleet.jobctl("-s", "web1", "start", "sh", "-c", "exit 4").stdout.strip()
    waited = fleet.jobctl("-s", "web1", "wait", job)
    assert waited.returncode == 4 and waited.stdout == "exited: 4\n"


def test_flags_override_the_profile(fleet: Fleet, pki: Pki) -> None:
    # olga may observe only: -c/-k beat [defaults].
    refused = fleet.jobctl("-s", "web1", "-c", pki.path("olga.pem"), "-k", pki.path("olga.key"),
                           "start", "true")
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    # Another server's CA for web1: the profile's ca was replaced, so TLS fails.
    wrong = fleet.jobctl("-s", "web1", "-C", str(fleet.dir / "web2-ca.pem"), "list")
    assert wrong.returncode == 3 and "certificate verify failed" in wrong.stderr
    assert fleet.jobctl("-s", "nosuch", "list").returncode == 2
    group_address = fleet.jobctl("-s", "web", "-a", "10.0.0.1", "list")
    assert group_address.returncode == 2 and "is a group" in group_address.stderr


def test_bad_config_is_one_clear_line(fleet: Fleet, tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text('[servers.a]\naddress = "x"\nprot = 1\n')
    env = {**fleet.env(), "JOBCTL_CONFIG": str(bad)}
    result = subprocess.run([*JOBCTL, "-s", "a", "list"], capture_output=True, text=True,
                            timeout=60, cwd=RUN_CWD, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"{bad}: servers.a: unknown field 'prot' "
                                     "(fields: address, port, server_name, certificate, key, ca, "
                                     "identity, like)")


async def test_library_fanout_one_stalled_server_never_blocks_the_others(
        fleet: Fleet, pki: Pki) -> None:
    """A server that accepts TCP and then says nothing holds its own task only:
    the others finish while it is still stalled (it is released only after)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stalled_port = listener.getsockname()[1]
    targets = [jobctl.Target(name, "127.0.0.1", fleet.servers[name].port,
                             certificate=pki.path("alice.pem"), key=pki.path("alice.key"),
                             ca=str(fleet.dir / f"{name}-ca.pem")) for name in NAMES]
    targets.insert(1, jobctl.Target("stalled", "127.0.0.1", stalled_port,
                                    certificate=pki.path("alice.pem"),
                                    key=pki.path("alice.key"), ca=pki.path("ca.pem")))
    done: list[str] = []
    others_done = trio.Event()

    def on_done(outcome: jobctl.Outcome[str]) -> None:
        done.append(outcome.target.name)
        if set(done) >= set(NAMES):
            others_done.set()

    async def work(client: jobctl.Client, target: jobctl.Target) -> str:
        return client.identity

    async def release_stalled() -> None:
        conn, _ = await listener.accept()
        await others_done.wait()  # deadlocks (test timeout) if fanout serialised
        conn.close()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_stalled)
            # The connect timeout is far away: only the release ends the stalled one.
            outcomes = await jobctl.fanout(targets, work, on_done=on_done,
                                           connect_timeout=600)
    listener.close()
    assert done[-1] == "stalled"
    assert [o.target.name for o in outcomes] == ["web1", "stalled", "web2", "web3"]
    assert [o.value for o in outcomes if o.ok] == ["alice"] * 3
    stalled = outcomes[1]
    assert isinstance(stalled.error, jobctl.ConnectionFailed)


def test_printer_writes_whole_lines_only(capfd: pytest.CaptureFixture[str]) -> None:
    from jobctl._fanout import LINE_LIMIT, Printer

    printer = Printer(["a", "bb"], prefix=True)
    printer.write("a", 1, b"one\ntw")
    printer.write("bb", 1, b"x")
    printer.write("a", 1, b"o\n")
    printer.write("bb", 2, b"err\n")
    printer.flush("bb")  # the end: a partial line gets its newline
    printer.write("a", 1, b"z" * LINE_LIMIT)  # no newline for too long: written anyway
    out, err = capfd.readouterr()
    assert out == "a:  one\na:  two\nbb: x\n" + "a:  " + "z" * LINE_LIMIT + "\n"
    assert err == "bb: err\n"


def test_a_closed_stdout_ends_quietly(fleet: Fleet) -> None:
    """`jobctl -s web run ... | head -1`: no traceback when the reader goes away."""
    proc = subprocess.Popen([*JOBCTL, "-s", "web", "run", "seq", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=RUN_CWD,
                            env=fleet.env(), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().endswith(b": 1\n")
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in err and b"Exception" not in err, err


def test_a_start_that_cannot_run_prints_ids_and_errors(fleet: Fleet) -> None:
    result = fleet.jobctl("-s", "web", "start", "no-such-command-i15")
    assert result.returncode == 1
    assert sorted(line.split(":")[0] for line in result.stdout.splitlines()) == list(NAMES)
    assert all(line.split(": ")[1].isdigit() for line in result.stdout.splitlines())
    errors = sorted(result.stderr.splitlines())
    assert [e.split(":")[0] for e in errors] == list(NAMES)
    assert all("command not found: no-such-command-i15" in e for e in errors)


def test_prefixes_are_colored_on_a_terminal(fleet: Fleet) -> None:
    master, slave = os.openpty()
    proc = subprocess.Popen([*JOBCTL, "-s", "web", "run", "echo", "hi"], stdout=slave,
                            stderr=subprocess.PIPE, cwd=RUN_CWD, env=fleet.env(),
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)  # returns when jobctl writes or exits
            except OSError:  # EIO: jobctl exited and closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(60) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = screen.decode().splitlines()
    assert sorted(lines) == sorted(f"\x1b[{color}m{name}:\x1b[0m hi"
                                   for color, name in zip((36, 33, 35), NAMES, strict=True))


def test_json_run_carries_each_servers_output(fleet: Fleet) -> None:
    result = fleet.jobctl("-s", "web", "--json", "run", "sh", "-c",
                          "echo out; echo err >&2; exit 2")
    assert result.returncode == 2, result.stderr
    objects = sorted((json.loads(line) for line in result.stdout.splitlines()),
                     key=lambda o: o["server"])
    assert [o["server"] for o in objects] == list(NAMES)
    for o in objects:
        assert (o["exit"], o["stdout"], o["stderr"], o["output_truncated"]) == \
            (2, "out\n", "err\n", False)
        assert o["status"]["state"] == "exited"


def test_options_a_group_cannot_honour_are_refused(fleet: Fleet) -> None:
    for args in (["stream", "--tail", "3", "1"], ["status", "-v", "1"],
                 ["run", "--timestamps", "true"],
                 ["prune", "--older-than", "1d"]):
        result = fleet.jobctl("-s", "web", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "is not supported with a group of servers" in result.stderr
        assert result.stdout == ""


def test_wait_timeout_on_a_group(fleet: Fleet) -> None:
    started = fleet.jobctl("-s", "web1", "start", "sleep", "600").stdout.strip()
    try:
        result = fleet.jobctl("-s", "web1", "wait", "--timeout", "0.5", started)
        assert result.returncode == 124
        group = subprocess.run([*JOBCTL, "-s", "web", "--json", "wait", "--timeout", "0.5",
                                started], capture_output=True, text=True, timeout=120,
                               cwd=RUN_CWD, env=fleet.env(), stdin=subprocess.DEVNULL)
        objects = {o["server"]: o for o in map(json.loads, group.stdout.splitlines())}
        assert objects["web1"]["exit"] == 124 and "timed out" in objects["web1"]["error"]
        # Elsewhere that ID is another job or none: the worst status wins either way.
        assert group.returncode == max(o["exit"] for o in objects.values())
    finally:
        fleet.jobctl("-s", "web1", "stop", "--grace", "0", started)


def test_list_state_filters_on_a_group(fleet: Fleet) -> None:
    """Issue 23: `--state` is repeatable; the fan-out once took its list as one state."""
    sleeper = fleet.jobctl("-s", "web1", "start", "sleep", "600").stdout.strip()
    try:
        done = fleet.jobctl("-s", "web1", "run", "true")
        assert done.returncode == 0
        running = fleet.jobctl("-s", "web", "list", "--state", "running")
        assert running.returncode == 0, running.stderr
        assert [line.split("\t")[0] for line in running.stdout.splitlines()] == \
            [f"web1: {sleeper}"]
        both = fleet.jobctl("-s", "web", "--json", "list", "--state", "running",
                            "--state", "exited")
        assert both.returncode == 0, both.stderr
        objects = {o["server"]: o for o in map(json.loads, both.stdout.splitlines())}
        states = {s["state"] for s in objects["web1"]["jobs"]}
        assert states == {"running", "exited"}
    finally:
        fleet.jobctl("-s", "web1", "stop", "--grace", "0", sleeper)


def _read_until(fd: int, marker: bytes, count: int = 1) -> bytes:
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(marker) < count:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, seen
        chunk = os.read(fd, 4096)
        assert chunk, seen
        seen += chunk
    return seen


def _stop_all(fleet: Fleet, detached: str) -> dict[str, str]:
    jobs = dict(re.findall(r"(web\d): jobctl: detached: job (\d+) keeps running", detached))
    for name, job in jobs.items():
        fleet.jobctl("-s", name, "stop", "--grace", "0", job)
    return jobs


def test_ctrl_c_on_a_group_run_detaches_per_server(fleet: Fleet) -> None:
    """Issue 23: no terminal: each server's line names its job, which runs on."""
    proc = subprocess.Popen([*JOBCTL, "-s", "web", "run", "sh", "-c",
                             "echo ready; exec sleep 1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=RUN_CWD, env=fleet.env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    err = b""
    try:
        _read_until(proc.stdout.fileno(), b"ready", count=len(NAMES))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        jobs = _stop_all(fleet, err.decode())
        assert sorted(jobs) == list(NAMES), err
        for name, job in jobs.items():
            assert f"(jobctl -s {name} stream {job}; jobctl -s {name} stop {job})" in \
                err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            _stop_all(fleet, err.decode())


@pytest.mark.parametrize("answer", [b"y\n", b"n\n"])
def test_ctrl_c_on_a_group_run_asks_on_a_terminal(fleet: Fleet, answer: bytes) -> None:
    main, secondary = pty.openpty()
    proc = subprocess.Popen([*JOBCTL, "-s", "web", "run", "sh", "-c",
                             "echo ready; exec sleep 1000"], stdin=secondary, stdout=secondary,
                            stderr=secondary, cwd=RUN_CWD, env=fleet.env())
    os.close(secondary)
    screen = b""
    try:
        screen += _read_until(main, b"ready", count=len(NAMES))
        proc.send_signal(signal.SIGINT)
        screen += _read_until(main, b"[y/N]")
        os.write(main, answer)
        if answer == b"y\n":
            assert proc.wait(60) == 128 + signal.SIGINT
        else:
            screen += _read_until(main, b"following on")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 130
            with contextlib.suppress(OSError):
                while chunk := os.read(main, 4096):
                    screen += chunk
            plain = re.sub(r"\x1b\[[0-9;]*m", "", screen.decode().replace("\r", ""))
            jobs = _stop_all(fleet, plain)
            assert sorted(jobs) == list(NAMES), screen
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"stop the job on 3 servers? [y/N]" in screen
    listed = fleet.jobctl("-s", "web", "list", "--state", "running")
    assert listed.stdout == ""


def test_stop_on_interrupt_on_a_group(fleet: Fleet) -> None:
    proc = subprocess.Popen([*JOBCTL, "-s", "web", "run", "--stop-on-interrupt", "sh", "-c",
                             "echo ready; exec sleep 1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=RUN_CWD, env=fleet.env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        _read_until(proc.stdout.fileno(), b"ready", count=len(NAMES))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fleet.jobctl("-s", "web", "list", "--state", "running").stdout == ""


def _bash_complete(fleet: Fleet, line: str) -> list[str]:
    """What bash's completion offers for ``line`` (the real script, the real jobctl)."""
    script = fleet.dir / "jobctl.bash"
    if not script.exists():
        script.write_text(fleet.jobctl("completion", "bash").stdout)
    bindir = fleet.dir / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "jobctl"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in JOBCTL) + ' "$@"\n')
    wrapper.chmod(0o755)
    test = (f"source {script}\n"
            f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n"
            "read -ra COMP_WORDS <<< \"$COMP_LINE\"; COMP_WORDS+=(''); "
            "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
            "_shtab_jobctl\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", test], capture_output=True, text=True, timeout=60,
                            env={**fleet.env(), "PATH": f"{bindir}:{os.environ['PATH']}"},
                            cwd=RUN_CWD)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_completion_follows_the_profile_and_sorts_ids(fleet: Fleet) -> None:
    """Issue 23: `-s NAME` selects where job IDs come from, `-s <TAB>` offers the
    names of config.toml, and IDs come in numeric order (2 before 10)."""
    before = {int(line.split("\t")[0]) for line in fleet.jobctl(
        "-s", "web2", "list").stdout.splitlines()}
    started = [int(fleet.jobctl("-s", "web2", "start", "true").stdout) for _ in range(11)]
    ids = sorted(before | set(started))
    assert _bash_complete(fleet, "jobctl -s web2 status ") == [str(i) for i in ids]
    assert _bash_complete(fleet, "jobctl status -s web2 ") == [str(i) for i in ids]
    assert _bash_complete(fleet, "jobctl status -s ") == ["all", "down", "web", "web1",
                                                           "web2", "web3"]
    assert _bash_complete(fleet, "jobctl -s ") == ["all", "down", "web", "web1", "web2", "web3"]
    script = fleet.jobctl("completion", "bash").stdout
    assert "compopt -o nosort" in script  # readline would sort 10 before 2
    assert "_describe -V" in fleet.jobctl("completion", "zsh").stdout  # unsorted group
    assert '-ka "(__jobctl_job_ids)"' in fleet.jobctl("completion", "fish").stdout


# -- issue 23 item 14: identities apart from servers ------------------------------------


def _identities_config(fleet: Fleet, pki: Pki, path: Path, *, old: bool) -> None:
    """web1..3 as in the fleet's config; alice, bob and olga (observe) as
    identities (``old``: as today's profiles: one server profile per identity)."""
    base = fleet.config.read_text().split("[servers.down]")[0].split("\n\n", 1)[1]
    lines: list[str] = []
    if old:
        lines += ["[defaults]", f'certificate = "{pki.path("alice.pem")}"',
                  f'key = "{pki.path("alice.key")}"', "", base]
        for who in ("bob", "olga"):
            lines += [f"[servers.web1-{who}]", 'address = "127.0.0.1"',
                      f"port = {fleet.servers['web1'].port}",
                      f'ca = "{fleet.dir / "web1-ca.pem"}"',
                      f'certificate = "{pki.path(f"{who}.pem")}"',
                      f'key = "{pki.path(f"{who}.key")}"', ""]
    else:
        for who in ("alice", "bob", "olga"):
            lines += [f"[identities.{who}]", f'certificate = "{pki.path(f"{who}.pem")}"',
                      f'key = "{pki.path(f"{who}.key")}"', ""]
        lines += ["[defaults]", 'identity = "alice"', "", base,
                  "[servers.web1-olga]", 'like = "web1"', 'identity = "olga"', ""]
    path.write_text("\n".join(lines).replace('ca = "web', f'ca = "{fleet.dir}/web'))


def _as(fleet: Fleet, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*JOBCTL, *args], capture_output=True, text=True, timeout=120,
                          cwd=RUN_CWD, env={**fleet.env(), "JOBCTL_CONFIG": str(config)},
                          stdin=subprocess.DEVNULL)


def test_identities_apart_from_servers_and_dash_i(fleet: Fleet, pki: Pki,
                                                  tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _identities_config(fleet, pki, config, old=False)
    # `all` is every server once (web1-olga is web1 under another identity).
    everywhere = _as(fleet, config, "--json", "-s", "all", "list")
    servers = sorted(json.loads(line)["server"] for line in everywhere.stdout.splitlines())
    assert servers == ["web1", "web2", "web3"], everywhere.stdout
    # The server's default identity (alice, from [defaults]); -i picks another.
    started = _as(fleet, config, "-s", "web2", "start", "true")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    owner = json.loads(_as(fleet, config, "-s", "web2", "--json", "status", job).stdout)
    assert owner["owner"] == "alice"
    by_bob = _as(fleet, config, "-s", "web2", "-i", "bob", "start", "true")
    status = json.loads(_as(fleet, config, "-s", "web2", "-i", "bob", "--json", "status",
                            by_bob.stdout.strip()).stdout)
    assert status["owner"] == "bob"
    # -i on a whole group, and a `like` server with its own identity.
    observed = _as(fleet, config, "-s", "all", "-i", "olga", "start", "true")
    assert observed.returncode == 1 and observed.stderr.count("role observe may not start") == 3
    assert "role observe" in _as(fleet, config, "-s", "web1-olga", "start", "true").stderr
    # -c/-k still win over -i.
    flags = _as(fleet, config, "-s", "web2", "-i", "olga", "-c", pki.path("alice.pem"),
                "-k", pki.path("alice.key"), "start", "true")
    assert flags.returncode == 0, flags.stderr
    unknown = _as(fleet, config, "-s", "web2", "-i", "nobody", "list")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (f"no identity 'nobody' in {config} "
                                      "(identities: alice, bob, olga)")
    names = _as(fleet, config, "completion", "--identity-names")
    assert names.stdout.split() == ["alice", "bob", "olga"]


def test_config_migrate_makes_identities_and_one_server_per_endpoint(
        fleet: Fleet, pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _identities_config(fleet, pki, config, old=True)
    # Today's format: `all` asks web1 three times (once per profile).
    before = _as(fleet, config, "--json", "-s", "all", "list")
    assert sorted(json.loads(line)["server"] for line in before.stdout.splitlines()) == [
        "web1", "web1-bob", "web1-olga", "web2", "web3"]
    old_text = config.read_text()
    printed = _as(fleet, config, "config", "migrate")
    assert printed.returncode == 0, printed.stderr
    assert config.read_text() == old_text  # printed only
    assert '[identities.alice]' in printed.stdout and '[identities.olga]' in printed.stdout
    written = _as(fleet, config, "config", "migrate", "--write")
    assert written.returncode == 0 and "migrated" in written.stdout
    assert (tmp_path / "config.toml.bak").read_text() == old_text
    assert config.stat().st_mode & 0o777 == 0o600
    after = _as(fleet, config, "--json", "-s", "all", "list")
    assert sorted(json.loads(line)["server"] for line in after.stdout.splitlines()) == [
        "web1", "web2", "web3"]
    job = _as(fleet, config, "-s", "web1-bob", "start", "true").stdout.strip()
    status = json.loads(_as(fleet, config, "-s", "web1", "-i", "bob", "--json", "status",
                            job).stdout)
    assert status["owner"] == "bob"
    again = _as(fleet, config, "config", "migrate")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout


def test_a_group_run_keeps_an_inherited_sigint_ignore(fleet: Fleet, tmp_path: Path) -> None:
    """Issue 23 item 13, for a group: Trio's signal receiver would replace the
    inherited "ignore"; it is not installed, and Ctrl-C does nothing."""
    flag = tmp_path / "go"
    words = [*JOBCTL, "-s", "web", "run", "sh", "-c",
             f"echo ready; while [ ! -e {flag} ]; do sleep 0.05; done; exit 7"]
    proc = subprocess.Popen(["sh", "-c", "trap '' INT; exec " + " ".join(f"'{w}'" for w in words)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=RUN_CWD,
                            env=fleet.env(), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        _read_until(proc.stdout.fileno(), b"ready", count=len(NAMES))
        proc.send_signal(signal.SIGINT)  # ignored: discarded as it is sent
        flag.touch()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 7, err
        assert b"detached" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
