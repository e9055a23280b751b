"""Trust (issue 13, items 4-6): a CRL file only revokes, certificates are used only
for their purpose (EKU), and the server key must be private to jobd."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol._x509 import CLIENT_AUTH, SERVER_AUTH, CertificateFormatError, extended_key_usage

from .conftest import JOBD, RUN_CWD, JobdProcess, Pki, crl_pem, custom_cert, start_jobd

NOT_CLIENT = "certificate is not for client authentication (no clientAuth extended key usage)"


def issue(ca: trustme.CA, directory: Path, name: str, *, cn: str, ou: str | None = None,
          eku: list[x509.ObjectIdentifier] | None = None, hosts: list[str] | None = None) -> None:
    """A leaf certificate of ``ca`` with exactly the EKU given (None: no EKU extension)
    and, with ``hosts``, a subjectAltName; its key is written mode 0600."""
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    custom_cert(ca, directory, name, subject, eku=eku, hosts=hosts)


def client(directory: Path, name: str) -> list[str]:
    return ["-c", str(directory / f"{name}.pem"), "-k", str(directory / f"{name}.key")]


def run_jobd(pki: Pki, tmp_path: Path, *extra: str, key: str | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    cmd = [*JOBD, "-c", pki.path("server.pem"), "-k", key or pki.path("server.key"),
           "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0",
           "--state-dir", str(tmp_path / "state"), *extra]
    return subprocess.run(cmd, capture_output=True, timeout=60, cwd=RUN_CWD,
                          stdin=subprocess.DEVNULL)


# -- item 4: the CRL file only ever revokes -----------------------------------------


@pytest.fixture
def rogue_ca(tmp_path: Path) -> trustme.CA:
    """A second CA whose holder mints an admin certificate (mallory) for itself."""
    ca = trustme.CA()
    issue(ca, tmp_path, "mallory", cn="mallory", ou="admin", eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return ca


def test_crl_file_holding_a_ca_certificate_is_refused_at_start(
        pki: Pki, rogue_ca: trustme.CA, tmp_path: Path) -> None:
    """A CA certificate and its (empty) CRL slipped into the CRL file used to make that
    CA trusted: its holder got in as admin. Now jobd refuses the file, in one line."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_pem(pki.ca) + rogue_ca.cert_pem.bytes() + crl_pem(rogue_ca))
    result = run_jobd(pki, tmp_path, "--crl", str(crl))
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, lines
    assert len(lines) == 1, lines
    assert "startup-failed" in lines[0] and str(crl) in lines[0], lines
    assert "holds a certificate" in lines[0], lines


def test_crl_file_with_a_certificate_is_refused_on_reload(
        pki: Pki, rogue_ca: trustme.CA, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_pem(pki.ca))
    server = start_jobd(pki, tmp_path / "state", "--crl", str(crl))
    try:
        refused = server.jobctl("alice", "list", extra=client(tmp_path, "mallory"))
        assert refused.returncode == 3, refused
        crl.write_bytes(crl_pem(pki.ca) + rogue_ca.cert_pem.bytes() + crl_pem(rogue_ca))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"error reload-failed .*holds a certificate")
        refused = server.jobctl("alice", "list", extra=client(tmp_path, "mallory"))
        assert refused.returncode == 3, refused
        assert refused.stderr.startswith(b"server refused the connection: TLS alert: ")
        assert server.jobctl("alice", "list").returncode == 0
        # a CRL-only file still loads and revokes
        alice = x509.load_pem_x509_certificate(Path(pki.path("alice.pem")).read_bytes())
        crl.write_bytes(crl_pem(pki.ca, (alice.serial_number,)))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"info reloaded ")
        assert server.jobctl("alice", "list").returncode == 3
        assert server.jobctl("bob", "list").returncode == 0
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("extra", "reason"), [
    (None, "no CRL in it"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "a certificate"),
    (b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n", "something other"),
    (b"  -----BEGIN TRUSTED CERTIFICATE-----\nMIIB\n-----END TRUSTED CERTIFICATE-----\n",
     "a certificate"),
    (b"x -----BEGIN CERTIFICATE-----\n", "not a whole PEM header"),
])
def test_crl_file_without_only_crls_is_refused(pki: Pki, tmp_path: Path, extra: bytes | None,
                                              reason: str) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(b"not a CRL\n" if extra is None else crl_pem(pki.ca) + extra)
    result = run_jobd(pki, tmp_path, "--crl", str(crl))
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "startup-failed" in lines[0] and f"cannot load CRL {crl}" in lines[0], lines
    assert reason in lines[0], lines


# -- item 5: extended key usage -----------------------------------------------------


def test_extended_key_usage_reader(pki: Pki, tmp_path: Path) -> None:
    issue(pki.ca, tmp_path, "both", cn="both", ou="admin",
          eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    issue(pki.ca, tmp_path, "none", cn="none", ou="admin")

    def der(name: str) -> bytes:
        return x509.load_pem_x509_certificate(
            (tmp_path / f"{name}.pem").read_bytes()).public_bytes(serialization.Encoding.DER)

    assert extended_key_usage(der("both")) == {SERVER_AUTH, CLIENT_AUTH}
    assert extended_key_usage(der("none")) is None
    serveronly = x509.load_pem_x509_certificate(Path(pki.path("serveronly.pem")).read_bytes())
    assert extended_key_usage(serveronly.public_bytes(serialization.Encoding.DER)) == {
        SERVER_AUTH}
    for bad in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", der("both")[:100], b"\x04\x00"):
        with pytest.raises(CertificateFormatError):
            extended_key_usage(bad)


def test_client_certificate_without_eku_is_refused(jobd: JobdProcess, tmp_path: Path) -> None:
    """OpenSSL takes a certificate without the EKU extension as good for any purpose;
    jobd requires clientAuth, and says so in an error frame."""
    issue(jobd.pki.ca, tmp_path, "noeku", cn="noeku", ou="admin")
    result = jobd.jobctl("alice", "list", extra=client(tmp_path, "noeku"))
    assert result.returncode == 3, result
    assert result.stderr.decode() == f"server refused the connection: {NOT_CLIENT}\n"
    jobd.wait_for_log(r"identity-refused .*no clientAuth extended key usage")


def test_client_certificate_with_server_only_eku_is_refused(jobd: JobdProcess) -> None:
    result = jobd.jobctl("serveronly", "list")
    assert result.returncode == 3, result
    assert result.stderr.startswith(b"server refused the connection: ")
    jobd.wait_for_log(r"connection-refused .*unsuitable certificate purpose")


@pytest.mark.parametrize(("name", "eku", "hosts"), [
    # (a client-only certificate: jobd itself refuses to serve it since issue 22,
    # test_round3_tls.py; jobctl's check is the same code as for no EKU at all)
    ("srv-noeku", None, ["localhost"]),
    ("srv-cnonly", [ExtendedKeyUsageOID.SERVER_AUTH], None),  # CN=localhost, no SAN
])
def test_jobctl_refuses_a_server_certificate_not_for_servers(
        pki: Pki, tmp_path: Path, name: str, eku: list[x509.ObjectIdentifier] | None,
        hosts: list[str] | None) -> None:
    issue(pki.ca, Path(pki.dir), name, cn="localhost", eku=eku, hosts=hosts)
    server = start_jobd(pki, tmp_path / "state", server=name)
    try:
        result = server.jobctl("alice", "list", extra=["--server-name", "localhost"])
        assert result.returncode == 3, result
        err = result.stderr.decode()
        assert err.startswith("TLS handshake failed: "), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    finally:
        assert server.stop() == 0


async def test_client_libraries_check_the_server_purpose(pki: Pki, tmp_path: Path) -> None:
    import jobctl

    issue(pki.ca, Path(pki.dir), "srv-noeku2", cn="server", hosts=["localhost"])
    server = start_jobd(pki, tmp_path / "state", server="srv-noeku2")
    try:
        with pytest.raises(jobctl.ConnectionFailed, match="no serverAuth extended key usage"):
            jobctl.connect_blocking(server.address, server.port, server_name="localhost",
                                    **pki.files("alice"))
        with pytest.raises(jobctl.ConnectionFailed, match="no serverAuth extended key usage"):
            async with jobctl.connect(server.address, server.port, server_name="localhost",
                                      **pki.files("alice")):
                pass
    finally:
        assert server.stop() == 0


# -- item 6: the server key must be private -------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_server_key_readable_by_others_is_refused(pki: Pki, tmp_path: Path, mode: int) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(Path(pki.path("server.key")).read_bytes())
    key.chmod(mode)
    result = run_jobd(pki, tmp_path, key=str(key))
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "startup-failed" in lines[0], lines
    assert f"chmod 600 {key}" in lines[0], lines
    assert f"{mode:04o}" in lines[0], lines


def test_server_key_made_readable_is_refused_on_reload(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(Path(pki.path("server.key")).read_bytes())
    key.chmod(0o600)
    server = start_jobd(pki, tmp_path / "state", "-k", str(key))
    try:
        key.chmod(0o644)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(rf"error reload-failed .*chmod 600 {key}")
        assert server.jobctl("alice", "list").returncode == 0
        key.chmod(0o400)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"info reloaded ")
    finally:
        assert server.stop() == 0


def test_welcome_still_works(jobd: JobdProcess) -> None:
    """The checks above leave ordinary certificates alone (trustme's list clientAuth)."""
    assert jobd.jobctl("alice", "list").returncode == 0
    assert os.stat(jobd.pki.path("server.key")).st_mode & 0o077 == 0
