"""jobctl stays lean (SPEC §6: `jobctl start true` at most a quarter of ssh).

What a run imports is checked, never how long it takes: the command path
must not import Trio, and the modules only some commands need are imported
by those commands alone.
"""

from __future__ import annotations

import os
import re
import subprocess

from .conftest import PYTHON, RUN_CWD, JobdProcess

LAZY = ("json", "shlex", "jobd", "jobd._config", "shtab", "jobctl._follow",
        "jobctl._completion", "argparse_manpage",
        # issue 15: certificates, profiles, fan-out and TOFU only when used
        "cryptography", "protocol._pki", "tomllib", "jobctl._profiles", "jobctl._fanout",
        "jobctl._trust", "jobctl._cert")


def imported(jobd: JobdProcess, *args: str) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    """Modules a real jobctl run imported (``python -X importtime``), and its result."""
    cmd = [PYTHON, "-X", "importtime", "-m", "jobctl", *jobd.pki.client_args("alice"),
           "-a", jobd.address, "-p", str(jobd.port), *args]
    result = subprocess.run(cmd, capture_output=True, timeout=60, cwd=RUN_CWD,
                            stdin=subprocess.DEVNULL, env=dict(os.environ))
    names = re.findall(rb"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", result.stderr, re.M)
    return {name.decode() for name in names}, result


#: What no one-shot command (start, status, stop) imports (issue 26's start-up
#: budget): the event loop, the async client, and the modules only jobd uses.
NEVER = ("trio", "jobctl._async", "sqlite3", "subprocess", "asyncio", "logging",
         "dataclasses", "inspect",  # protocol/_record.py: records without them
         "typing",  # only the type checker reads the annotations (TYPE_CHECKING = False)
         "random",  # only a reconnect's back-off
         "protocol._pki", "cryptography", "jobd")
#: What an installed jobctl does not import either, though an editable install's
#: import finder (in ``site``, before jobctl runs) does.
NOT_INSTALLED = ("pathlib", "urllib", "ipaddress", "fnmatch")


def _assert_lean(modules: set[str]) -> None:
    assert "jobctl._cli" in modules and "protocol" in modules  # the parse works
    assert not {m for m in modules if m.split(".")[0] in NEVER or m in NEVER}
    assert not set(LAZY) & modules
    if not any(m.startswith("__editable__") for m in modules):  # an installed wheel
        assert not {m for m in modules if m.split(".")[0] in NOT_INSTALLED}, sorted(modules)


def test_start_imports_neither_trio_nor_what_other_commands_need(jobd: JobdProcess) -> None:
    modules, result = imported(jobd, "start", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().isdigit()
    _assert_lean(modules)


def test_status_and_stop_import_no_more_than_start(jobd: JobdProcess) -> None:
    job = jobd.jobctl("alice", "start", "sleep", "30").stdout.decode().strip()
    started, _ = imported(jobd, "start", "true")
    for command in (["status", job], ["stop", job]):
        modules, result = imported(jobd, *command)
        assert result.returncode == 0, result.stderr[-2000:]
        _assert_lean(modules)
        assert modules <= started, sorted(modules - started)


def test_json_output_imports_json_when_asked(jobd: JobdProcess) -> None:
    job = jobd.jobctl("alice", "start", "true").stdout.decode().strip()
    modules, result = imported(jobd, "--json", "status", job)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(b"{")
    assert "json" in modules and "trio" not in modules


def test_the_daemon_never_imports_cryptography() -> None:
    """`jobd ca` needs the jobd[ca] extra; the daemon itself must not (issue 15)."""
    result = subprocess.run([PYTHON, "-X", "importtime", "-c",
                             "import jobd.__main__, jobd._server, jobd._expiry"],
                            capture_output=True, timeout=60, cwd=RUN_CWD,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    names = re.findall(rb"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", result.stderr, re.M)
    assert b"jobd._server" in names
    assert not [n for n in names if n.startswith(b"cryptography")]
