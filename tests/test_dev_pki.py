"""scripts/dev-pki: the development PKI is what the rest of the project assumes.

The script runs once per module into a temporary directory; each test then
inspects the result with the openssl command line and Python's ssl module,
including a real TLS 1.3 handshake over memory BIOs (no sockets needed).
"""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path
from typing import cast

import pytest

from .conftest import JOBCTL, JOBD, ROOT

SCRIPT = ROOT / "scripts" / "dev-pki"
#: The script wraps `jobd ca` and `jobctl cert`: the commands under test.
ENV = {**os.environ, "JOBD": " ".join(JOBD), "JOBCTL": " ".join(JOBCTL)}

CLIENTS = {"alice": "control", "olga": "observe", "root": "admin"}
LEAVES = ("server", *CLIENTS)
ALL = ("ca", *LEAVES)


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=check, timeout=60,
        env=ENV,
    )


def x509(pki: Path, name: str, *args: str, check: bool = True) -> str:
    return run("openssl", "x509", "-in", pki / f"{name}.pem", "-noout", *args, check=check).stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "made-by-script"
    result = run(SCRIPT, directory)
    for name in ALL:
        assert f"{name}.pem, {name}.key" in result.stdout
    return directory


def test_makes_exactly_the_expected_files(pki: Path) -> None:
    expected = {f"{name}.{ext}" for name in ALL for ext in ("pem", "key")}
    expected |= {"policy.toml", "index.json", "crl.pem"}  # a `jobd ca` directory
    assert {p.name for p in pki.iterdir()} == expected


@pytest.mark.parametrize("name", ALL)
def test_private_keys_are_private(pki: Path, name: str) -> None:
    assert stat.S_IMODE((pki / f"{name}.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ALL)
def test_ecdsa_p256_sha256_and_key_matches_certificate(pki: Path, name: str) -> None:
    text = x509(pki, name, "-text")
    assert "Public Key Algorithm: id-ecPublicKey" in text
    assert "NIST CURVE: P-256" in text
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    key_public = run("openssl", "pkey", "-in", pki / f"{name}.key", "-pubout").stdout
    assert key_public == x509(pki, name, "-pubkey")


def test_ca(pki: Path) -> None:
    assert x509(pki, "ca", "-subject", "-nameopt", "RFC2253").strip() == (
        "subject=CN=jobd development CA"
    )
    extensions = x509(pki, "ca", "-ext", "basicConstraints,keyUsage")
    assert "critical" in extensions
    assert "CA:TRUE" in extensions
    assert "Certificate Sign" in extensions
    # Ten years, give or take leap days.
    assert "will not expire" in x509(pki, "ca", "-checkend", str(3640 * 86400))
    assert "will expire" in x509(pki, "ca", "-checkend", str(3660 * 86400), check=False)


def test_server_certificate(pki: Path) -> None:
    assert x509(pki, "server", "-subject", "-nameopt", "RFC2253").strip() == "subject=CN=server"
    extensions = x509(pki, "server", "-ext", "subjectAltName,extendedKeyUsage,basicConstraints")
    assert "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1" in extensions
    assert "TLS Web Server Authentication" in extensions
    assert "TLS Web Client Authentication" not in extensions
    assert "CA:FALSE" in extensions


@pytest.mark.parametrize(("name", "role"), CLIENTS.items())
def test_client_certificate(pki: Path, name: str, role: str) -> None:
    subject = x509(pki, name, "-subject", "-nameopt", "RFC2253").strip()
    assert subject == f"subject=CN={name},OU={role}"
    extensions = x509(pki, name, "-ext", "subjectAltName,extendedKeyUsage,basicConstraints")
    assert "TLS Web Client Authentication" in extensions
    assert "TLS Web Server Authentication" not in extensions
    assert "Subject Alternative Name" not in extensions
    assert "CA:FALSE" in extensions


@pytest.mark.parametrize("name", LEAVES)
def test_leaves_last_825_days(pki: Path, name: str) -> None:
    assert "will not expire" in x509(pki, name, "-checkend", str(824 * 86400))
    assert "will expire" in x509(pki, name, "-checkend", str(826 * 86400), check=False)


@pytest.mark.parametrize(
    ("name", "purpose"),
    [("server", "sslserver")] + [(name, "sslclient") for name in CLIENTS],
)
def test_chain_verifies_for_its_purpose_only(pki: Path, name: str, purpose: str) -> None:
    ca, cert = pki / "ca.pem", pki / f"{name}.pem"
    ok = run("openssl", "verify", "-CAfile", ca, "-purpose", purpose, cert)
    assert ok.stdout.strip() == f"{cert}: OK"
    other = "sslclient" if purpose == "sslserver" else "sslserver"
    wrong = run("openssl", "verify", "-CAfile", ca, "-purpose", other, cert, check=False)
    assert wrong.returncode != 0
    assert "certificate purpose" in wrong.stdout + wrong.stderr  # X509_V_ERR_INVALID_PURPOSE


@pytest.mark.parametrize("name", ALL)
def test_ssl_context_loads_each_pair(pki: Path, name: str) -> None:
    ssl.create_default_context().load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, server_name: str) -> ssl.SSLObject:
    """Run a TLS handshake over memory BIOs; return the server side."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(10):
        for side in (c, s):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return s
    raise AssertionError("handshake did not complete")


def contexts(pki: Path, client_name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(pki / "ca.pem")
    server.load_cert_chain(pki / "server.pem", pki / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(pki / "ca.pem")
    client.load_cert_chain(pki / f"{client_name}.pem", pki / f"{client_name}.key")
    return client, server


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1", "::1"])
@pytest.mark.parametrize(("name", "role"), CLIENTS.items())
def test_mutual_tls13_handshake(pki: Path, name: str, role: str, server_name: str) -> None:
    client, server = contexts(pki, name)
    s = handshake(client, server, server_name)
    assert s.version() == "TLSv1.3"
    peer = s.getpeercert()
    assert peer is not None
    rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", peer["subject"])
    subject = {key: value for rdn in rdns for key, value in rdn}
    assert subject == {"commonName": name, "organizationalUnitName": role}


def test_server_name_outside_the_san_is_refused(pki: Path) -> None:
    client, server = contexts(pki, "alice")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(client, server, "example.com")


def test_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    run(SCRIPT, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refused = run(SCRIPT, tmp_path, check=False)
    assert refused.returncode == 1
    assert "--force" in refused.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    run(SCRIPT, "--force", tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    assert after["ca.pem"] != before["ca.pem"]
    # What the new CA issued verifies against it, and not against the old one.
    ok = run("openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "alice.pem")
    assert ok.returncode == 0
    old_ca = tmp_path.parent / "old-ca.pem"
    old_ca.write_bytes(before["ca.pem"])
    stale = run("openssl", "verify", "-CAfile", old_ca, tmp_path / "alice.pem", check=False)
    assert stale.returncode != 0


def test_usage_errors(tmp_path: Path) -> None:
    assert run(SCRIPT, check=False).returncode == 2
    assert run(SCRIPT, "--bogus", tmp_path, check=False).returncode == 2
    assert run(SCRIPT, tmp_path / "a", tmp_path / "b", check=False).returncode == 2
    assert not list(tmp_path.iterdir())


def test_the_directory_is_a_jobd_ca(pki: Path, tmp_path: Path) -> None:
    """`jobd ca sign --ca DIR` goes on from where dev-pki left off, with its policy."""
    pki = Path(shutil.copytree(pki, tmp_path / "ca"))  # the module's PKI stays as made
    run(*JOBCTL, "cert", "request", "--name", "olga", "--role", "observe", "--out", tmp_path)
    run(*JOBD, "ca", "sign", tmp_path / "olga.csr", "--ca", pki)
    ok = run("openssl", "verify", "-CAfile", pki / "ca.pem", tmp_path / "olga.pem")
    assert ok.returncode == 0
    run(*JOBCTL, "cert", "request", "--name", "olga", "--role", "admin",
        "--out", tmp_path / "greedy")
    refused = run(*JOBD, "ca", "sign", tmp_path / "greedy" / "olga.csr", "--ca", pki, check=False)
    assert refused.returncode == 1 and "not admin" in refused.stderr
