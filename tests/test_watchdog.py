"""systemd's watchdog: jobd pings WATCHDOG=1 from its event loop when WATCHDOG_USEC is set."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from jobd._notify import notify_watchdog, watchdog_interval

from .conftest import Pki, start_jobd

#: Each recv waits at most this long: the pings come every 50 ms (half of
#: WATCHDOG_USEC); the bound only turns a missing ping into a failure, not a hang.
RECV_TIMEOUT = 20.0


def receive_until(sock: socket.socket, pings: int, *, ready: bool = False) -> list[bytes]:
    """Datagrams until ``pings`` WATCHDOG=1 came (and READY=1, if ``ready``)."""
    got: list[bytes] = []
    while got.count(b"WATCHDOG=1") < pings or (
            ready and not any(d.startswith(b"READY=1") for d in got)):
        got.append(sock.recv(4096))
    return got


def test_jobd_pings_the_watchdog(pki: Pki, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(RECV_TIMEOUT)
        sock.bind(path)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
        env.pop("WATCHDOG_PID", None)
        server = start_jobd(pki, tmp_path / "state", env=env)
        try:
            got = receive_until(sock, 3, ready=True)
            assert set(got) - {b"WATCHDOG=1"} == {next(d for d in got if d.startswith(b"READY"))}
            # Jobs never see the watchdog's variables.
            job = server.jobctl("alice", "start", "sh", "-c", "echo ${WATCHDOG_USEC:-unset}")
            assert job.returncode == 0
            out = server.jobctl("alice", "stream", job.stdout.decode().strip())
            assert out.stdout == b"unset\n"
            # Still pinging after serving requests: the loop is alive.
            receive_until(sock, 2)
        finally:
            assert server.stop() == 0


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("1000", None, 0.0005),
    (None, None, None),
    ("", None, None),
    ("0", None, None),
    ("-5", None, None),
    ("ten", None, None),
    ("30000000", "1", None),  # meant for another process
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           interval: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert watchdog_interval() == interval


def test_notify_watchdog_sends_the_ping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(RECV_TIMEOUT)
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify_watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"
