"""Issue 22 items 12 and 13: inputs any client or user can send (a list's ``after``
beyond what job IDs can be; a config.toml built to explode or to crash jobctl)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki
from .hostile import RawTLS, jobd, packed

__all__ = ["jobd"]  # the fixture


@pytest.mark.parametrize("request_", [
    {"type": "list", "after": 2**63},
    {"type": "list", "after": 2**64 - 1},
    {"type": "status", "job": 2**63},
    {"type": "delete", "job": 2**64 - 1},
    {"type": "stream", "job": 2**63, "position": 0},
    {"type": "attach", "job": 2**63},
])
def test_ids_beyond_sqlite_are_bad_requests(jobd: JobdProcess, request_: dict[str, object]) -> None:
    """``list`` with ``after`` >= 2**63 was an ``internal`` error and a "bug" log line
    any client could repeat: job IDs are bounded in the protocol (2**63 - 1)."""
    with RawTLS.to(jobd, "root") as conn:
        conn.hello()
        assert conn.send(packed(request_))
        reply = conn.read_until_closed(20)
    error = reply.only_error()
    assert error.code is p.ErrorCode.BAD_REQUEST, error
    assert "2**63" in error.message, error
    assert "request-failed" not in jobd.log_text()
    # jobd keeps serving
    assert jobd.jobctl("root", "list").returncode == 0


def test_jobctl_refuses_ids_the_protocol_refuses(jobd: JobdProcess) -> None:
    result = jobd.jobctl("root", "status", str(2**63))
    assert result.returncode == 2, result
    assert b"not a job ID" in result.stderr
    assert jobd.jobctl("root", "status", str(2**63 - 1)).stderr == b"process not found\n"


def _chain(n: int, *, twice: bool) -> str:
    """Groups g0 .. g{n-1}, each naming the next (twice), the last a server."""
    lines = ['[servers.s]', 'address = "127.0.0.1"', '[groups]']
    for i in range(n):
        member = f"g{i + 1}" if i + 1 < n else "s"
        lines.append(f'g{i} = [{", ".join([repr(member)] * (2 if twice else 1))}]'
                     .replace("'", '"'))
    return "\n".join(lines) + "\n"


def _jobctl_with_config(tmp_path: Path, text: str, server: str, pki: Pki,
                        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    env = {**os.environ, "JOBCTL_CONFIG": str(path), "XDG_CONFIG_HOME": str(tmp_path / "x")}
    return subprocess.run([*JOBCTL, "-s", server, "-c", pki.path("alice.pem"), "-k",
                           pki.path("alice.key"), "list"],
                          capture_output=True, env=env, timeout=timeout, cwd=RUN_CWD,
                          stdin=subprocess.DEVNULL)


def test_groups_naming_the_next_twice_expand_once(tmp_path: Path, pki: Pki) -> None:
    """40 groups each naming the next twice hung jobctl (2**40 expansions); now each
    group is expanded once. 30 levels are within the depth bound: the group is the
    one server s, which nothing listens for (port 1): exit 3, not a hang."""
    text = _chain(30, twice=True).replace('address = "127.0.0.1"',
                                          'address = "127.0.0.1"\nport = 1')
    result = _jobctl_with_config(tmp_path, text, "g0", pki, timeout=30)
    assert result.returncode == 3, result
    assert b"Traceback" not in result.stderr
    assert b"connection refused" in result.stderr, result.stderr


@pytest.mark.parametrize(("text", "server", "fragment"), [
    (_chain(40, twice=True), "g0", "groups nest deeper than 32"),
    (_chain(3000, twice=False), "g0", "groups nest deeper than 32"),
    ('[servers.s]\naddress = "127.0.0.1"\n[groups]\nx = ' + "[" * 3000 + "]" * 3000 + "\n",
     "s", "nested too deeply"),
    ('[servers.s]\naddress = "127.0.0.1\\u0000evil"\n', "s",
     "servers.s: address must not contain control characters"),
    ('[servers.s]\naddress = "127.0.0.1"\nca = "ca\\u0000.pem"\n', "s",
     "servers.s: ca must not contain control characters"),
    ('[defaults]\nkey = "a\\nb"\n[servers.s]\naddress = "h"\n', "s",
     "defaults: key must not contain control characters"),
    ('[servers.s]\naddress = "h"\n[groups]\ng = ["s", 5]\n', "g",
     "groups.g must be a list of server or group names"),
])
def test_config_mistakes_are_one_line_exit_2(tmp_path: Path, pki: Pki, text: str,
                                             server: str, fragment: str) -> None:
    """A 3,000-deep chain or deeply nested arrays gave a RecursionError traceback, a NUL
    in ``address`` a TypeError traceback: every config mistake is one line, exit 2."""
    result = _jobctl_with_config(tmp_path, text, server, pki)
    assert result.returncode == 2, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines
