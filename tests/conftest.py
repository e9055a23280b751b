"""Shared fixtures: a trustme PKI on disk, real jobd processes, the real jobctl CLI."""

from __future__ import annotations

import datetime
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

#: The source tree (bench/, scripts/, docs/). In CI's installed-package run the
#: tests are copied out of the tree, and JOBD_SOURCE_ROOT names it.
ROOT = Path(os.environ.get("JOBD_SOURCE_ROOT") or Path(__file__).resolve().parent.parent)
PYTHON = sys.executable
#: Set by .ci/run for the run against the built wheel: the commands under test are
#: the installed console scripts, and the packages must come from site-packages.
INSTALLED = os.environ.get("JOBD_TEST_INSTALLED") == "1"
#: Where the real commands run: never the source tree, so that a module missing
#: from the installed package cannot be found in the working directory instead.
RUN_CWD = Path(tempfile.gettempdir())


def _command(name: str) -> list[str]:
    if INSTALLED:
        script = Path(sys.executable).parent / name
        assert script.exists(), f"{script} is not installed"
        return [str(script)]
    return [PYTHON, "-m", name]


#: How to run the daemon and the CLI: ``[*JOBD, "--help"]``.
JOBD = _command("jobd")
JOBCTL = _command("jobctl")

# A test run started in the background of a non-interactive shell (`make test &`)
# inherits SIGINT ignored, and so would every job the in-process engine tests
# spawn: their stop sequence's SIGINT step would do nothing. (A real jobd is not
# affected: it handles SIGINT itself, and exec resets handled signals.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Hypothesis: the example counts are each test's own; machine speed must never
# fail a test (a loaded 2-core CI machine is slow, and a fresh clone has no
# example database).
hypothesis_settings.register_profile(
    "jobd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("jobd")
READY_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _jobd_logger_restored() -> Iterator[None]:
    """An in-process ``serve()`` routes the "jobd" logger into its event log and
    stops it propagating (jobd._log.route_engine_logs), for good: put it back
    after each test, so that a later test's ``caplog`` sees the engine's records
    whatever ran before it (pytest 9.0 and older capture through propagation)."""
    logger = logging.getLogger("jobd")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def client_args(self, who: str) -> list[str]:
        return ["-c", self.path(f"{who}.pem"), "-k", self.path(f"{who}.key"),
                "-C", self.path("ca.pem")]

    def files(self, who: str) -> dict[str, str]:
        return {"certificate": self.path(f"{who}.pem"), "key": self.path(f"{who}.key"),
                "ca": self.path("ca.pem")}


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> None:
    leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    (directory / f"{name}.key").chmod(0o600)  # jobd refuses a key others may read
    leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))


def custom_cert(ca: trustme.CA, directory: Path, name: str, subject: list[x509.NameAttribute],
                *, eku: list[x509.ObjectIdentifier] | None,
                hosts: list[str] | None = None) -> None:
    """A leaf certificate of ``ca`` that trustme cannot make (several OUs, exactly the
    EKU given, or none with None) and, with ``hosts``, a subjectAltName; written to
    ``name``.pem and ``name``.key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(h) for h in hosts]), critical=False)
    cert = builder.sign(ca._private_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (directory / f"{name}.key").chmod(0o600)


def client_leaf(ca: trustme.CA, *, common_name: str, organization_unit_name: str | None = None,
                not_before: datetime.datetime | None = None,
                not_after: datetime.datetime | None = None) -> trustme.LeafCert:
    """A client certificate of ``ca`` with the extensions trustme gives its leaves
    (clientAuth and serverAuth) but no subjectAltName: ``trustme.CA.issue_cert``
    without host names writes an empty one, which RFC 5280 forbids and
    cryptography 51 refuses. Without ``organization_unit_name`` the subject has
    no OU at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization_unit_name is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                          organization_unit_name))
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = x509.oid.ExtendedKeyUsageOID
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage.CLIENT_AUTH, usage.SERVER_AUTH]),
                       critical=True)
        .sign(ca._private_key, hashes.SHA256())
    )
    return trustme.LeafCert(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM), [])


def crl_pem(ca: trustme.CA, revoked: Iterable[int] = ()) -> bytes:
    """A CRL signed by ``ca`` revoking the certificates with these serial numbers."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               .next_update(now + datetime.timedelta(days=1)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
    return builder.sign(ca._private_key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    _write_leaf(d, "server", ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="server"))
    for name, role in (("alice", "control"), ("bob", "control"), ("olga", "observe"),
                       ("root", "admin"), ("wizard", "wizard")):
        _write_leaf(d, name, client_leaf(ca, common_name=name, organization_unit_name=role))
    _write_leaf(d, "norole", client_leaf(ca, common_name="norole"))
    _write_leaf(d, "nocn", ca.issue_cert("nocn.example", organization_unit_name="control"))
    now = datetime.datetime.now(datetime.UTC)
    _write_leaf(d, "expired", client_leaf(
        ca, common_name="expired", organization_unit_name="control",
        not_before=now - datetime.timedelta(days=10), not_after=now - datetime.timedelta(days=1)))
    _write_leaf(d, "future", client_leaf(
        ca, common_name="future", organization_unit_name="control",
        not_before=now + datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=10)))
    ou = NameOID.ORGANIZATIONAL_UNIT_NAME
    usage = x509.oid.ExtendedKeyUsageOID
    custom_cert(ca, d, "tworoles", [x509.NameAttribute(NameOID.COMMON_NAME, "tworoles"),
                                    x509.NameAttribute(ou, "control"),
                                    x509.NameAttribute(ou, "admin")], eku=[usage.CLIENT_AUTH])
    custom_cert(ca, d, "serveronly", [x509.NameAttribute(NameOID.COMMON_NAME, "serveronly"),
                                      x509.NameAttribute(ou, "admin")], eku=[usage.SERVER_AUTH])
    other = trustme.CA()
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    _write_leaf(d, "stranger", client_leaf(other, common_name="stranger",
                                           organization_unit_name="admin"))
    _write_leaf(d, "otherserver", other.issue_cert("localhost", "127.0.0.1", "::1",
                                                   common_name="server"))
    return Pki(d, ca)


@dataclass
class JobdProcess:
    proc: subprocess.Popen[bytes]
    port: int
    address: str
    state_dir: Path
    pki: Pki
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log_count(self, text: str, count: int, timeout: float = 30.0) -> int:
        """Wait (on the condition) until ``text`` occurs at least ``count`` times in
        the log; the number of times. jobd writes a turn's lines after the turn's
        closes, so a client can see its connection closed before the line is read."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = "\n".join(self.lines).count(text)
                remaining = deadline - time.monotonic()
                if seen >= count or remaining <= 0:
                    return seen
                self._cond.wait(remaining)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait (on a condition, not a sleep loop) for a log line matching pattern."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line matching {pattern!r} in:\n"
                                         + "\n".join(self.lines))
                self._cond.wait(remaining)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def jobctl(self, who: str, *args: str, timeout: float = 60.0,
               extra: list[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [*JOBCTL, *self.pki.client_args(who), "-a", self.address,
               "-p", str(self.port), *(extra or []), *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=RUN_CWD,
                              env=env, stdin=subprocess.DEVNULL)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(EXIT_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def start_jobd(pki: Pki, state_dir: Path, *extra: str, address: str = "127.0.0.1",
               port: int = 0, server: str = "server",
               env: dict[str, str] | None = None) -> JobdProcess:
    cmd = [*JOBD, "-c", pki.path(f"{server}.pem"), "-k",
           pki.path(f"{server}.key"), "-C", pki.path("ca.pem"), "-a", address, "-p", str(port),
           "--state-dir", str(state_dir), "--stop-grace", "0.5", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=RUN_CWD,
                            env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    port_found: int | None = None
    while port_found is None:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(remaining, 0))
        if not ready:
            proc.kill()
            proc.wait()
            raise AssertionError("jobd did not become ready:\n" + "\n".join(lines))
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            proc.wait()
            raise AssertionError(f"jobd exited {proc.returncode}:\n" + buf.decode()
                                 + "\n".join(lines))
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace")
            lines.append(line)
            m = re.search(r"listening address=\S*:(\d+)", line)
            if m:
                port_found = int(m.group(1))
    jp = JobdProcess(proc, port_found, address, state_dir, pki, lines)
    if buf:
        jp.lines.append(buf.decode(errors="replace"))
    threading.Thread(target=jp._drain, daemon=True).start()
    return jp


@pytest.fixture
def jobd(pki: Pki, tmp_path: Path) -> Iterator[JobdProcess]:
    server = start_jobd(pki, tmp_path / "state")
    try:
        yield server
    finally:
        server.stop()
