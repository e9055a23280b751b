"""Helpers for the robustness tests: hostile clients, a well-behaved bystander, probes.

- :class:`RawTLS`: a blocking TLS 1.3 client with a real certificate that
  sends whatever bytes it is given and decodes whatever frames come back,
  without the protocol's state machine in the way.
- :class:`Bystander`: a well-behaved client that keeps working while hostile
  ones attack: a long live stream and a persistent connection, checked after
  each attack, and a check that the stream received every line in order.
- Probes: a process's resident memory, waiting for many sockets to be closed
  by the server, raising the file-descriptor limit.

Nothing here sleeps to wait for a condition: reads have deadlines (socket
timeouts, ``select``), threads are joined with timeouts.
"""

from __future__ import annotations

import contextlib
import datetime
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import jobctl
import protocol as p

from .conftest import JobdProcess, Pki, start_jobd

_HEADER = struct.Struct(">I")


def frame(payload: bytes, *, length: int | None = None) -> bytes:
    """A length prefix (``len(payload)`` unless *length* lies) and the payload."""
    return _HEADER.pack(len(payload) if length is None else length) + payload


def packed(obj: Any) -> bytes:
    """A frame holding ``msgpack.packb(obj)``: any object, valid message or not."""
    return frame(msgpack.packb(obj, use_bin_type=True))


HELLO = p.encode_frame(p.Hello(software="hostile 0"))
#: Decode amplification (issue 13 item 10): one array of a million empty arrays, a
#: whole 1 MiB frame, that decoded to 85 MB of lists before its type was looked at.
AMPLIFIER = packed({"type": "status", "job": 1, "x": [[]] * 1048551})
#: The same as a hello, which a certificate without a role may still send.
AMPLIFIER_HELLO = packed({"type": "hello", "version": 1, "x": [[]] * 1048546})


def start_frame(argv: list[bytes] | None = None, **fields: Any) -> bytes:
    """A raw start request with any fields, valid or not (``argv`` defaults to ``true``)."""
    return packed({"type": "start", "argv": [b"true"] if argv is None else argv, **fields})


def client_context(pki: Pki, who: str | None = "alice") -> ssl.SSLContext:
    """TLS 1.3, the server checked against the test CA; *who*'s certificate (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.path("ca.pem"))
    if who is not None:
        ctx.load_cert_chain(pki.path(f"{who}.pem"), pki.path(f"{who}.key"))
    return ctx


@dataclass
class Reply:
    """What a hostile client got back: the decoded frames, and how the connection ended."""

    messages: list[p.Message] = field(default_factory=list)
    closed: bool = False  # EOF or reset seen before the deadline
    garbage: bytes = b""  # bytes left that are not a whole frame (must stay empty)

    @property
    def errors(self) -> list[p.Error]:
        return [m for m in self.messages if isinstance(m, p.Error)]

    def only_error(self) -> p.Error:
        """The single error frame the server answered with (after anything expected)."""
        errors = self.errors
        assert len(errors) == 1, self.messages
        assert self.messages[-1] is errors[0], self.messages
        return errors[0]


def expect_error(reply: Reply, code: p.ErrorCode, *fragments: str) -> p.Error:
    """The one error frame of *code* that *reply* holds (its message containing each
    fragment), then the close."""
    assert reply.closed, f"the server did not close the connection: {reply}"
    assert reply.garbage == b""
    error = reply.only_error()
    assert error.code is code, error
    for fragment in fragments:
        assert fragment in error.message, error
    return error


class RawTLS:
    """A TLS 1.3 connection to jobd with *who*'s certificate, speaking raw bytes."""

    def __init__(self, address: str, port: int, ctx: ssl.SSLContext, *,
                 timeout: float = 30.0, session: ssl.SSLSession | None = None) -> None:
        raw = socket.create_connection((address, port), timeout=timeout)
        try:
            self.tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except BaseException:
            raw.close()
            raise
        self._buffer = bytearray()

    @classmethod
    def to(cls, jobd: JobdProcess, who: str = "alice", **kw: Any) -> RawTLS:
        return cls(jobd.address, jobd.port, client_context(jobd.pki, who), **kw)

    def __enter__(self) -> RawTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()

    def send(self, data: bytes) -> bool:
        """Send *data*; False if the server had already closed the connection."""
        try:
            self.tls.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return False
        return True

    def half_close(self) -> None:
        """End our direction at the TCP level (no close_notify): the server sees EOF."""
        # socket.socket's own shutdown: SSLSocket.shutdown would drop the TLS state.
        with contextlib.suppress(OSError):  # already reset by the server
            socket.socket.shutdown(self.tls, socket.SHUT_WR)

    def close_notify(self, timeout: float = 30.0) -> bool:
        """End our direction cleanly (TLS close_notify) and wait for the server's.

        True if the server answered with its own close_notify (a clean close)."""
        self.tls.settimeout(timeout)
        try:
            self.tls.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            return False
        return True

    def hello(self) -> p.Welcome:
        """Send a valid hello and return the welcome."""
        assert self.send(HELLO)
        message = self.next_message(30.0)
        assert isinstance(message, p.Welcome), message
        return message

    def next_message(self, timeout: float) -> p.Message | None:
        """The next whole frame, decoded; None at EOF or when the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            message = self._pop_frame()
            if message is not None:
                return message
            data = self._recv(deadline)
            if not data:
                return None
            self._buffer += data

    def read_until_closed(self, timeout: float = 30.0) -> Reply:
        """Every frame the server sends until it closes the connection (or the deadline)."""
        reply = Reply()
        deadline = time.monotonic() + timeout
        while True:
            message = self._pop_frame()
            if message is not None:
                reply.messages.append(message)
                continue
            if time.monotonic() >= deadline:
                break
            try:
                data = self._recv(deadline)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                reply.closed = time.monotonic() < deadline
                break
            self._buffer += data
        reply.garbage = bytes(self._buffer)
        return reply

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        self.tls.settimeout(remaining)
        try:
            return self.tls.recv(1 << 20)
        except TimeoutError:
            return b""

    def _pop_frame(self) -> p.Message | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (size,) = _HEADER.unpack_from(buffer)
        assert 0 < size <= p.MAX_FRAME_SIZE, f"server sent a frame of {size} bytes"
        if len(buffer) < 4 + size:
            return None
        message = p.decode_payload(bytes(buffer[4:4 + size]))
        del buffer[:4 + size]
        return message


def attack(jobd: JobdProcess, *chunks: bytes, hello: bool = True, who: str = "alice",
           half_close: bool = False, timeout: float = 30.0) -> Reply:
    """Connect, optionally say hello, send *chunks*, and read until the server closes."""
    with RawTLS.to(jobd, who) as conn:
        if hello:
            conn.hello()
        for chunk in chunks:
            if not conn.send(chunk):
                break
        if half_close:
            conn.half_close()
        return conn.read_until_closed(timeout)


def vm_rss(pid: int) -> int:
    """Resident memory of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def ensure_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least *needed* (children inherit it;
    the hard limit too if it is lower: the tests run as root, as CI does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            hard = needed
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextlib.contextmanager
def soft_fd_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE to *limit* for a while, e.g. around
    starting a child that inherits it (the hard limit is left alone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        hard = limit  # root (as in CI) may raise the hard limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_all_closed(socks: Iterable[socket.socket], timeout: float, *,
                    leave: int = 0) -> list[socket.socket]:
    """Wait until the server closed every socket (EOF or reset), or all but *leave*
    of them; those still open then, or after *timeout*, are returned. Works on plain
    and TLS sockets (TLS: close_notify or EOF)."""
    pending = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while len(pending) > leave:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _events in poller.poll(remaining * 1000):
            sock = pending.get(fd)
            if sock is None:
                continue
            if _closed_now(sock):
                del pending[fd]
                poller.unregister(fd)
    return list(pending.values())


def open_now(socks: Iterable[socket.socket]) -> list[socket.socket]:
    """The sockets the server has not closed, checked once, without waiting."""
    return [s for s in socks if not _closed_now(s)]


def _closed_now(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def rogue_certificate(directory: Path, name: str, *, issuer: x509.Name | None = None) -> None:
    """A client certificate (CN=*name*, OU=admin, clientAuth) signed by its own key:
    self-signed, or (with *issuer*) claiming an issuer whose key it does not have."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


# -- a well-behaved client that must not notice any of it ------------------------------


class Bystander:
    """A real client working through an attack; ``check()`` after each step.

    On enter it starts a job printing numbered lines until a stop file appears,
    and streams that job in a thread; it also keeps one connection open. On
    exit it ends the job and checks the stream got every line, in order, then
    the job's final status.
    """

    LINES_MAX = 3000  # the job also ends by itself after this many lines (~1 minute)

    def __init__(self, jobd: JobdProcess, tmp: Path, who: str = "bob") -> None:
        self.jobd = jobd
        self.who = who
        self.stop_file = tmp / f"bystander-{id(self)}.stop"
        self.checks = 0
        self._lines: list[bytes] = []
        self._end: p.End | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._first_line = threading.Event()

    def connect(self) -> jobctl.BlockingClient:
        return jobctl.connect_blocking(self.jobd.address, self.jobd.port,
                                       server_name="localhost", **self.jobd.pki.files(self.who))

    def __enter__(self) -> Bystander:
        self.client = self.connect()
        script = (f'i=0; while [ ! -e "$1" ] && [ $i -lt {self.LINES_MAX} ]; do '
                  'echo line-$i; i=$((i+1)); sleep 0.02; done; echo end')
        self.job = self.client.start(["sh", "-c", script, "sh", str(self.stop_file)]).id
        self._thread = threading.Thread(target=self._stream, daemon=True)
        self._thread.start()
        assert self._first_line.wait(10), "the bystander's stream got nothing"
        self.check()
        return self

    def _stream(self) -> None:
        try:
            with self.connect() as client:
                buffer = b""
                for event in client.stream(self.job):
                    if isinstance(event, p.OutputChunk):
                        buffer += event.data
                        *lines, buffer = buffer.split(b"\n")
                        self._lines.extend(lines)
                        if lines:
                            self._first_line.set()
                    else:
                        self._end = event
                assert buffer == b"", buffer
        except BaseException as exc:
            self._error = exc

    def check(self) -> None:
        """The persistent connection still answers, and a new connection is served."""
        status = self.client.status(self.job)
        assert status.owner == self.who
        with self.connect() as fresh:
            assert any(s.id == self.job for s in fresh.list())
        self.checks += 1

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.stop_file.touch()
        assert self._thread is not None
        self._thread.join(30)
        try:
            if exc_type is None:
                assert not self._thread.is_alive(), "the bystander's stream did not end"
                assert self._error is None, repr(self._error)
                assert self._end is not None
                assert self._end.status.describe() == "exited: 0"
                lines = self._lines
                assert lines[-1] == b"end", lines[-3:]
                assert lines[:-1] == [b"line-%d" % i for i in range(len(lines) - 1)]
        finally:
            self.client.close()


@contextlib.contextmanager
def many(count: int, factory: Any) -> Iterator[list[Any]]:
    """*count* objects from *factory()*, each closed on exit."""
    made: list[Any] = []
    try:
        for _ in range(count):
            made.append(factory())
        yield made
    finally:
        for thing in made:
            with contextlib.suppress(OSError):
                thing.close()


# -- fixtures: a module imports them (and lists them in __all__) ---------------------


@pytest.fixture(scope="module")
def jobd(pki: Pki, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[JobdProcess]:
    """One jobd for a whole module of attacks: that it keeps serving is the point."""
    module = request.module.__name__.rpartition(".")[2]
    server = start_jobd(pki, tmp_path_factory.mktemp(module) / "state")
    try:
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def bystander(jobd: JobdProcess, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Bystander]:
    with Bystander(jobd, tmp_path_factory.mktemp("bystander")) as b:
        yield b
