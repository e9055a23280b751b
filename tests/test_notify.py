"""jobd._notify: the sd_notify datagrams, received by a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobd._notify import notify, notify_ready, notify_reloading, notify_stopping

# The datagram is queued before notify() returns, so recv() returns at once;
# the timeout only turns a bug into a failure instead of a hang.
RECV_TIMEOUT = 20.0


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT)
    sock.bind(address)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"jobd-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
    with bound_socket("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> socket.socket:
    sock: socket.socket = request.getfixturevalue(f"{request.param}_socket")
    return sock


def test_notify_sends_the_message_verbatim(receiver: socket.socket) -> None:
    assert notify("STATUS=héllo\nEXTEND_TIMEOUT_USEC=5000000") is True
    assert receiver.recv(4096) == "STATUS=héllo\nEXTEND_TIMEOUT_USEC=5000000".encode()


def test_ready(receiver: socket.socket) -> None:
    assert notify_ready("listening on [::1]:8000") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=listening on [::1]:8000"


def test_ready_keeps_status_on_one_line(receiver: socket.socket) -> None:
    assert notify_ready("two\nlines\nMAINPID=1") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=two lines MAINPID=1"


def test_stopping(receiver: socket.socket) -> None:
    assert notify_stopping() is True
    assert receiver.recv(4096) == b"STOPPING=1"


def test_reloading_carries_the_monotonic_clock(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify_reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receiver.recv(4096).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_one_datagram_per_message(receiver: socket.socket) -> None:
    assert notify_reloading()
    assert notify_ready("reloaded")
    assert notify_stopping()
    assert receiver.recv(4096).startswith(b"RELOADING=1\n")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=reloaded"
    assert receiver.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, ""])
def test_no_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False
    assert notify_ready("x") is False
    assert notify_stopping() is False
    assert notify_reloading() is False


def test_missing_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here"))
    assert notify_ready("x") is False


def test_missing_abstract_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"@jobd-test-nobody-{os.urandom(8).hex()}")
    assert notify_stopping() is False


def test_regular_file_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a socket")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "file"))
    assert notify_ready("x") is False


def test_stream_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify_ready("x") is False


def test_closed_receiver_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "gone")
    bound_socket(path).close()  # the file stays, nobody listens: ECONNREFUSED
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify_ready("x") is False


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234"])
def test_unsupported_address_returns_false(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify_ready("x") is False
