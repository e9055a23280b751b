"""Issue 22 items 5, 7 and 8: jobd refuses a server certificate clients would refuse
(at start and on reload); jobctl names the real cause of a certificate error; pins
cannot be sidestepped by spelling the address differently."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import jobctl

from .conftest import JOBCTL, JOBD, RUN_CWD, JobdProcess, Pki, crl_pem, start_jobd
from .hostile import RawTLS, jobd

__all__ = ["jobd"]  # the fixture

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def leaf(pki: Pki, directory: Path, name: str, *, eku: list[x509.ObjectIdentifier],
         not_before: datetime.datetime = NOW - DAY, not_after: datetime.datetime = NOW + DAY,
         cn: str = "server", ou: str | None = None) -> tuple[Path, Path]:
    """A certificate of the test CA for localhost/127.0.0.1 with exactly ``eku``."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    cert = (x509.CertificateBuilder().subject_name(x509.Name(subject))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(pki.ca._private_key, hashes.SHA256()))
    pem, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return pem, key_path


def run_jobd(pki: Pki, tmp_path: Path, cert: Path | str, key: Path | str
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*JOBD, "-c", str(cert), "-k", str(key), "-C", pki.path("ca.pem"),
                           "-a", "127.0.0.1", "-p", "0", "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60, cwd=RUN_CWD,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("case", "fragment"), [
    ("client-only", "is not for server authentication (its extended key usage lacks"),
    ("expired", "expired on "),
    ("future", "is not valid until "),
    ("other-key", "key values mismatch"),
])
def test_jobd_refuses_a_server_certificate_clients_would_refuse(
        pki: Pki, tmp_path: Path, case: str, fragment: str) -> None:
    """``-c alice.pem`` started, logged ``listening``, and every client then failed with
    ``unsuitable certificate purpose``."""
    cert, key = {
        "client-only": lambda: leaf(pki, tmp_path, "c", eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                                    cn="alice", ou="control"),
        "expired": lambda: leaf(pki, tmp_path, "c", eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                                not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        "future": lambda: leaf(pki, tmp_path, "c", eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                               not_before=NOW + DAY, not_after=NOW + 10 * DAY),
        "other-key": lambda: (Path(pki.path("server.pem")), Path(pki.path("alice.key"))),
    }[case]()
    result = run_jobd(pki, tmp_path, cert, key)
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1 and "startup-failed" in lines[0], lines
    assert fragment in lines[0], lines
    assert "listening" not in result.stderr


def test_a_server_certificate_without_eku_starts_with_a_warning(pki: Pki,
                                                                tmp_path: Path) -> None:
    """Without the extension a certificate suits every purpose to OpenSSL, and a pinned
    client accepts it; jobctl with a CA does not: jobd says so."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .sign(pki.ca._private_key, hashes.SHA256()))
    (tmp_path / "noeku.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "noeku.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "noeku.key").chmod(0o600)
    server = start_jobd(pki, tmp_path / "state", "-c", str(tmp_path / "noeku.pem"),
                        "-k", str(tmp_path / "noeku.key"))
    try:
        server.wait_for_log(r"warning certificate-warning .*has no extended key usage")
    finally:
        assert server.stop() == 0


def test_reload_keeps_the_old_certificate_when_the_new_one_would_be_refused(
        pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(Path(pki.path("server.pem")).read_bytes())
    key.write_bytes(Path(pki.path("server.key")).read_bytes())
    key.chmod(0o600)
    server = start_jobd(pki, tmp_path / "state", "-c", str(cert), "-k", str(key))
    try:
        leaf(pki, tmp_path, "server", eku=[ExtendedKeyUsageOID.CLIENT_AUTH], cn="alice",
             ou="control")  # the files replaced by a client certificate and its key
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"error reload-failed .*not for server authentication")
        assert server.jobctl("alice", "list").returncode == 0
    finally:
        assert server.stop() == 0


# -- item 7: certificate errors name their cause -----------------------------------


@pytest.mark.parametrize(("who", "message"), [
    ("expired", "your certificate {path} expired on {date}: renew it (jobctl cert renew "
                "{path}) and have the request signed"),
    ("future", "your certificate {path} is not valid until {date} (is this machine's "
               "clock right?)"),
])
def test_jobctl_reads_its_own_certificates_dates(jobd: JobdProcess, who: str,
                                                 message: str) -> None:
    """A not-yet-valid certificate showed "bad certificate (is the client certificate
    valid and issued by the server's CA?)"; now jobctl says why, before connecting."""
    cert = x509.load_pem_x509_certificate(Path(jobd.pki.path(f"{who}.pem")).read_bytes())
    when = cert.not_valid_after_utc if who == "expired" else cert.not_valid_before_utc
    result = jobd.jobctl(who, "list")
    assert result.returncode == 3, result
    expected = message.format(path=jobd.pki.path(f"{who}.pem"),
                              date=f"{when:%Y-%m-%d %H:%M} UTC")
    assert result.stderr.decode() == expected + "\n"
    with pytest.raises(jobctl.ConnectionFailed, match="your certificate"):
        jobctl.connect_blocking(jobd.address, jobd.port, **jobd.pki.files(who))


def expired_crl(pki: Pki, revoked: list[int]) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(NOW - 10 * DAY).next_update(NOW - DAY))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(NOW - 10 * DAY).build())
    return builder.sign(pki.ca._private_key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def test_each_alert_has_its_own_hint(pki: Pki, tmp_path: Path) -> None:
    """The CA hint was appended to "certificate revoked" too."""
    alice = x509.load_pem_x509_certificate(Path(pki.path("alice.pem")).read_bytes())
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_pem(pki.ca, [alice.serial_number]))
    server = start_jobd(pki, tmp_path / "state", "--crl", str(crl))
    try:
        revoked = server.jobctl("alice", "list")
        assert revoked.returncode == 3
        assert revoked.stderr.decode() == (
            "server refused the connection: TLS alert: certificate revoked (the client "
            "certificate was revoked: ask the CA for a new one)\n")
        stranger = server.jobctl("stranger", "list")
        assert stranger.returncode == 3
        assert stranger.stderr.decode() == (
            "server refused the connection: TLS alert: unknown ca (is the client "
            "certificate issued by the server's CA?)\n")
        # a CRL past its next update: OpenSSL refuses everyone with "certificate expired"
        crl.write_bytes(expired_crl(pki, []))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"info reloaded ")
        expired = server.jobctl("olga", "list")
        assert expired.returncode == 3
        assert expired.stderr.decode() == (
            "server refused the connection: TLS alert: certificate expired (the client "
            "certificate has expired, or the server's CRL has: renew it, or tell the "
            "server's operator)\n")
    finally:
        assert server.stop() == 0


def test_the_server_still_refuses_a_not_yet_valid_certificate(jobd: JobdProcess) -> None:
    """jobctl no longer sends one; a client that does is refused at TLS, as before."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            RawTLS.to(jobd, "future") as conn:
        conn.hello()
    jobd.wait_for_log(r"connection-refused .*certificate is not yet valid")


# -- item 8: pins cannot be sidestepped by another spelling ------------------------


def _tofu(server: JobdProcess, home: Path, address: str, *extra: str
          ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env["XDG_CONFIG_HOME"] = str(home)
    pki = server.pki
    return subprocess.run([*JOBCTL, "-c", pki.path("alice.pem"), "-k", pki.path("alice.key"),
                           "-a", address, "-p", str(server.port), *extra, "list"],
                          capture_output=True, text=True, timeout=60, cwd=RUN_CWD, env=env,
                          stdin=subprocess.DEVNULL)


def test_another_spelling_of_the_address_meets_the_same_pin(pki: Pki, tmp_path: Path) -> None:
    """``-a 127.1 --trust-on-first-use`` accepted a changed certificate that
    ``127.0.0.1`` refused: ``127.1``, ``0x7f000001`` and ``2130706433`` each got a new
    pin. And the banner printed as one line with literal ``\\n``."""
    home = tmp_path / "home"
    first = start_jobd(pki, tmp_path / "state")
    port = first.port
    try:
        pinned = _tofu(first, home, "127.0.0.1", "--trust-on-first-use")
        assert pinned.returncode == 0, pinned.stderr
    finally:
        assert first.stop() == 0
    known = home / "jobctl" / "known_servers"
    assert known.read_text().splitlines()[0].startswith(f"[127.0.0.1]:{port} ")
    # the same port, another certificate (another CA's): a server in the middle
    changed = start_jobd(pki, tmp_path / "state2", port=port, server="otherserver")
    try:
        for spelling in ("127.0.0.1", "127.1", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"):
            result = _tofu(changed, home, spelling, "--trust-on-first-use")
            assert result.returncode == 3, (spelling, result)
            lines = result.stderr.splitlines()
            assert lines[0] == (f"@@@ WARNING: THE CERTIFICATE OF SERVER [127.0.0.1]:{port} "
                                "HAS CHANGED @@@"), lines
            assert lines[1].startswith("Someone could be intercepting"), lines
            assert lines[3].startswith("  pinned:  SHA256 ") and "\\n" not in result.stderr
        # a name never pinned meets the pin of the address it connects to (CheckHostIP)
        result = _tofu(changed, home, "localhost", "--trust-on-first-use")
        assert result.returncode == 3, result
        assert result.stderr.splitlines()[:2] == [
            f"@@@ WARNING: THE CERTIFICATE OF SERVER [127.0.0.1]:{port} HAS CHANGED @@@",
            f"(the address [localhost]:{port} connected to)"], result.stderr
    finally:
        assert changed.stop() == 0
    assert len(known.read_text().splitlines()) == 1  # nothing was pinned meanwhile


def test_a_new_name_pins_its_address_too(jobd: JobdProcess, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = _tofu(jobd, home, "localhost", "--trust-on-first-use")
    assert result.returncode == 0, result.stderr
    pins = (home / "jobctl" / "known_servers").read_text().splitlines()
    assert [line.split()[0] for line in pins] == [f"[localhost]:{jobd.port}",
                                                  f"[127.0.0.1]:{jobd.port}"]
    assert _tofu(jobd, home, "127.1").returncode == 0  # no flag needed: pinned
