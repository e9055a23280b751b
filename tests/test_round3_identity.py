"""Issue 22 items 2 and 4, jobd's half: one CN under two roles does not lock the admin
out, and revocation reaches open connections."""

from __future__ import annotations

from pathlib import Path

import jobctl
import protocol as p

from .conftest import JobdProcess, Pki, client_leaf, start_jobd
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
