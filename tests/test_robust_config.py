"""Limits on jobd's command line that would disable a defence, or crash jobd, are refused;
the connection limit never promises more connections than jobd has descriptors for."""

from __future__ import annotations

import subprocess

import pytest

from jobd._admission import FD_RESERVE, connection_limit
from jobd._config import parse_args

from .conftest import JOBD, RUN_CWD, Pki
from .hostile import soft_fd_limit

REQUIRED = ["-c", "server.pem", "-k", "server.key", "-C", "ca.pem"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # NaN made the first stop crash the daemon (trio.move_on_after(nan) in the ladder)
        (["--stop-grace", "nan"], "must be a finite number of seconds"),
        # infinity: a shutdown that never ends for a job ignoring SIGINT
        (["--stop-grace", "inf"], "must be a finite number of seconds"),
        (["--stop-grace", "-1"], "must not be negative"),
        # NaN: every connection failed with ValueError; 0: every connection timed out
        (["--handshake-timeout", "nan"], "must be a finite number of seconds"),
        (["--handshake-timeout", "inf"], "must be a finite number of seconds"),
        (["--handshake-timeout", "0"], "must be more than 0 seconds"),
        (["--max-connections", "0"], "must be at least 1"),
        (["--max-connections", "-5"], "must be at least 1"),
    ],
)
def test_limits_that_disable_a_defence_are_usage_errors(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([*REQUIRED, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: jobd" in err and message in err, err


def test_sensible_limits_are_accepted() -> None:
    config = parse_args([*REQUIRED, "--stop-grace", "0", "--handshake-timeout", "0.5",
                         "--max-connections", "1"])
    assert (config.stop_grace, config.handshake_timeout, config.max_connections) == (0, 0.5, 1)


def test_the_jobd_command_refuses_a_nan_grace(pki: Pki) -> None:
    result = subprocess.run(
        [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
         "-C", pki.path("ca.pem"), "-p", "0", "--stop-grace", "nan"],
        capture_output=True, timeout=60, cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert b"--stop-grace: must be a finite number of seconds: nan" in result.stderr


@pytest.mark.parametrize(
    ("nofile", "configured", "expected"),
    [
        (4096, 1000, 1000),
        # two descriptors per connection slot, one per handshake slot
        (1024, 1000, (1024 - FD_RESERVE) // 3),
        (512, 1000, 85),
        (512, 50, 50),
        (256, 1000, 1),
    ],
)
def test_connection_limit_follows_the_descriptor_limit(nofile: int, configured: int,
                                                       expected: int) -> None:
    with soft_fd_limit(nofile):
        assert connection_limit(configured) == expected
