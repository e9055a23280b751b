"""Issue 22 items 2 and 4, jobd's half: one CN under two roles does not lock the admin
out, and revocation reaches open connections."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import jobctl
import protocol as p

from .conftest import JobdProcess, Pki, client_leaf, crl_pem, start_jobd
from .hostile import HELLO, RawTLS


def leaf(pki: Pki, directory: Path, name: str, cn: str, role: str) -> dict[str, str]:
    """A client certificate of the test CA, written as ``name``.pem/.key."""
    cert = client_leaf(pki.ca, common_name=cn, organization_unit_name=role)
    cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    (directory / f"{name}.key").chmod(0o600)
    cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    return {"certificate": str(directory / f"{name}.pem"),
            "key": str(directory / f"{name}.key"), "ca": pki.path("ca.pem")}


def welcomed(server: JobdProcess, files: dict[str, str]) -> tuple[RawTLS, p.Message | None]:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(files["ca"])
    ctx.load_cert_chain(files["certificate"], files["key"])
    conn = RawTLS(server.address, server.port, ctx)
    assert conn.send(HELLO)
    return conn, conn.next_message(30)


def test_an_observer_named_root_cannot_take_the_admins_share(pki: Pki, tmp_path: Path) -> None:
    """Five connections of an observe certificate CN=root used the share of "root"
    before the admin reserve was looked at: the real admin was refused."""
    fake = leaf(pki, tmp_path, "fake-root", "root", "observe")
    server = start_jobd(pki, tmp_path / "state", "--max-connections", "20")  # share: 5
    held: list[RawTLS] = []
    try:
        for _ in range(5):
            conn, answer = welcomed(server, fake)
            held.append(conn)
            assert isinstance(answer, p.Welcome) and answer.role == "observe", answer
        conn, answer = welcomed(server, fake)  # the observer's own share is used up
        conn.close()
        assert isinstance(answer, p.Error) and answer.code is p.ErrorCode.LIMIT_EXCEEDED
        # the admin root gets in, up to its own share, while the observer holds its five
        with jobctl.connect_blocking(server.address, server.port, server_name="localhost",
                                     **pki.files("root")) as admin:
            assert admin.list() == []
        for _ in range(5):
            conn, answer = welcomed(server, {**pki.files("root")})
            held.append(conn)
            assert isinstance(answer, p.Welcome) and answer.role == "admin", answer
        conn, answer = welcomed(server, pki.files("root"))
        conn.close()
        assert answer == p.Error(p.ErrorCode.LIMIT_EXCEEDED,
                                 "too many connections for root (limit 5 per identity)")
    finally:
        for conn in held:
            conn.close()
        assert server.stop() == 0


def test_revocation_closes_open_connections(pki: Pki, tmp_path: Path) -> None:
    """After ``revoke`` and SIGHUP, a revoked certificate's open connection still
    started jobs: only new connections met the CRL."""
    from cryptography import x509

    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_pem(pki.ca, []))
    server = start_jobd(pki, tmp_path / "state", "--crl", str(crl))
    try:
        idle, welcome = welcomed(server, pki.files("bob"))
        assert isinstance(welcome, p.Welcome)
        streaming = jobctl.connect_blocking(server.address, server.port,
                                            server_name="localhost", **pki.files("bob"))
        bystander = jobctl.connect_blocking(server.address, server.port,
                                            server_name="localhost", **pki.files("root"))
        job = streaming.start(["sh", "-c", "echo ready; exec sleep 600"])
        chunks = streaming.stream(job.id)
        assert next(chunks).data == b"ready\n"  # type: ignore[union-attr]
        bob = x509.load_pem_x509_certificate(Path(pki.path("bob.pem")).read_bytes())
        crl.write_bytes(crl_pem(pki.ca, [bob.serial_number]))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"info reloaded ")
        server.wait_for_log(r"warning connection-revoked .*who=bob .*serial="
                            f"{bob.serial_number:x}")
        reply = idle.read_until_closed(30)
        assert reply.only_error() == p.Error(
            p.ErrorCode.PERMISSION_DENIED,
            "certificate revoked: the server closed this connection"), reply
        with pytest.raises(jobctl.JobctlError):  # the stream ends with the connection
            for _ in chunks:
                pass
        with pytest.raises(jobctl.JobctlError):
            streaming.start(["true"])
        idle.close()
        streaming.close()
        assert bystander.status(job.id).state is p.JobState.RUNNING  # root, unharmed
        bystander.close()
        # new connections are refused at the handshake, as before
        refused = server.jobctl("bob", "list")
        assert refused.returncode == 3 and b"certificate revoked" in refused.stderr
        # only bob's one job: nothing was started on the revoked connection
        assert server.jobctl("root", "list").stdout.count(b"\n") == 1
    finally:
        assert server.stop() == 0


def test_crl_and_serial_walk_agree_with_cryptography(pki: Pki) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from protocol._x509 import crl_revocations, issuer_and_serial

    for who in ("alice", "server", "nocn"):
        cert = x509.load_pem_x509_certificate(Path(pki.path(f"{who}.pem")).read_bytes())
        assert issuer_and_serial(cert.public_bytes(serialization.Encoding.DER)) == (
            cert.issuer.public_bytes(), cert.serial_number)
    serials = [1, 2**159 - 1, 0x80]  # the last: a leading zero byte in DER
    for revoked in ([], serials):
        crl = x509.load_pem_x509_crl(crl_pem(pki.ca, revoked))
        issuer, found = crl_revocations(crl.public_bytes(serialization.Encoding.DER))
        assert issuer == crl.issuer.public_bytes() and found == set(revoked)
