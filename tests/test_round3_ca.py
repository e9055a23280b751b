"""Issue 22 items 1-3, the CA's half: ``jobd ca sign`` never writes over files (its
own least of all), one CN is one identity, and names with C1 controls or format
characters are refused and never printed raw."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import JOBCTL, JOBD, RUN_CWD, JobdProcess, Pki, client_leaf, start_jobd
from .hostile import jobd

__all__ = ["jobd"]  # the fixture

EVIL = "ci-\x9b31m\u202eevil"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60,
                          cwd=RUN_CWD, stdin=subprocess.DEVNULL)


def jobd_ca(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(*JOBD, "ca", *args)


def csr(path: Path, cn: str, role: str | None = None) -> Path:
    """A request with any CN (``jobctl cert request`` refuses some), written to ``path``."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)] if role else []
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(
        key, hashes.SHA256())
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    assert jobd_ca("init", directory).returncode == 0
    policy = directory / "policy.toml"
    policy.write_text(policy.read_text() + '"*" = ["observe"]\nroot = ["admin", "control"]\n'
                      '"ci-*" = ["observe"]\n')
    return directory


def index(ca: Path) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = json.loads((ca / "index.json").read_text())["certificates"]
    return entries


def test_sign_names_the_certificate_after_the_cn_never_over_the_ca(ca: Path) -> None:
    """``jobd ca sign ca.csr`` in the CA directory wrote mallory's certificate over
    ca.pem: sign, crl and revoke failed until it was restored by hand."""
    ca_pem, crl_pem = (ca / "ca.pem").read_bytes(), (ca / "crl.pem").read_bytes()
    signed = jobd_ca("sign", csr(ca / "ca.csr", "mallory", "observe"), "--ca", ca)
    assert signed.returncode == 0, signed.stderr
    assert (ca / "ca.pem").read_bytes() == ca_pem
    mallory = x509.load_pem_x509_certificate((ca / "mallory.pem").read_bytes())
    assert mallory.subject.rfc4514_string() == "CN=mallory,OU=observe"
    assert ": " + str(ca / "mallory.pem") in signed.stdout
    # CNs that are the CA's own file names: refused, even with --force; nothing issued
    for name in ("ca", "crl"):
        for force in ((), ("--force",)):
            before = len(index(ca))
            refused = jobd_ca("sign", csr(ca / f"{name}-x.csr", name, "observe"), "--ca", ca,
                              *force)
            assert refused.returncode == 1, refused
            assert "is one of the CA's own files" in refused.stderr
            assert len(refused.stderr.splitlines()) == 1
            assert len(index(ca)) == before
    # --out naming a CA file: refused too
    refused = jobd_ca("sign", csr(ca / "x.csr", "x", "observe"), "--ca", ca, "--out",
                      ca / "index.json", "--force")
    assert refused.returncode == 1 and "one of the CA's own files" in refused.stderr
    assert (ca / "ca.pem").read_bytes() == ca_pem and (ca / "crl.pem").read_bytes() == crl_pem
    assert jobd_ca("revoke", ca / "mallory.pem", "--ca", ca).returncode == 0
    assert jobd_ca("crl", "--ca", ca).returncode == 0


def test_sign_never_overwrites_without_force(ca: Path, tmp_path: Path) -> None:
    """``alice.csr`` replaced an existing alice.pem (anyone's request, named so)."""
    other = tmp_path / "requests"
    other.mkdir()
    first = jobd_ca("sign", csr(other / "a.csr", "alice", "observe"), "--ca", ca)
    assert first.returncode == 0, first.stderr
    pem = (other / "alice.pem").read_bytes()
    again = jobd_ca("sign", csr(other / "b.csr", "alice", "observe"), "--ca", ca)
    assert again.returncode == 1
    assert again.stderr.strip() == (f"jobd ca sign: {other / 'alice.pem'} exists; --force "
                                    "replaces it, or give --out FILE")
    assert (other / "alice.pem").read_bytes() == pem
    forced = jobd_ca("sign", other / "b.csr", "--ca", ca, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (other / "alice.pem").read_bytes() != pem
    # a symlink planted at the output is not followed, not replaced without --force
    (other / "link.pem").symlink_to(ca / "ca.pem")
    refused = jobd_ca("sign", other / "b.csr", "--ca", ca, "--out", other / "link.pem")
    assert refused.returncode == 1 and "exists" in refused.stderr


def test_one_cn_is_one_identity(ca: Path, tmp_path: Path) -> None:
    """``"*" = ["observe"]`` let anyone get an observe certificate CN=root, whose
    connections took the admin's share (and a control one would own root's jobs)."""
    admin = jobd_ca("sign", csr(tmp_path / "root-admin.csr", "root", "admin"), "--ca", ca,
                    "--out", tmp_path / "root-admin.pem")
    assert admin.returncode == 0, admin.stderr
    for role in ("observe", "control"):
        refused = jobd_ca("sign", csr(tmp_path / f"root-{role}.csr", "root", role), "--ca", ca,
                          "--out", tmp_path / f"root-{role}.pem")
        assert refused.returncode == 1, refused
        assert "'root' was issued as admin" in refused.stderr, refused.stderr
        assert not (tmp_path / f"root-{role}.pem").exists()
    # the same role again (a renewal) needs no flag
    renewed = jobd_ca("sign", csr(tmp_path / "root2.csr", "root", "admin"), "--ca", ca,
                      "--out", tmp_path / "root2.pem")
    assert renewed.returncode == 0, renewed.stderr
    # a deliberate change of role
    changed = jobd_ca("sign", tmp_path / "root-control.csr", "--ca", ca, "--out",
                      tmp_path / "root-control.pem", "--allow-new-role")
    assert changed.returncode == 0, changed.stderr
    # revoked certificates still hold their name
    assert jobd_ca("revoke", tmp_path / "root-admin.pem", "--ca", ca).returncode == 0
    refused = jobd_ca("sign", csr(tmp_path / "r3.csr", "root", "observe"), "--ca", ca,
                      "--out", tmp_path / "r3.pem")
    assert refused.returncode == 1 and "issued as admin, control" in refused.stderr
    # an index written before entries kept CN and role apart is read from the subject
    entries = index(ca)
    for entry in entries:
        entry.pop("cn", None)
        entry.pop("role", None)
    (ca / "index.json").write_text(json.dumps({"certificates": entries}))
    refused = jobd_ca("sign", tmp_path / "r3.csr", "--ca", ca, "--out", tmp_path / "r3.pem")
    assert refused.returncode == 1 and "issued as admin, control" in refused.stderr
    # server certificates are not client identities
    server = jobd_ca("sign", csr(tmp_path / "s.csr", "carol"), "--ca", ca, "--server",
                     "--san", "localhost", "--out", tmp_path / "s.pem")
    assert server.returncode == 0, server.stderr
    assert jobd_ca("sign", csr(tmp_path / "c.csr", "carol", "observe"), "--ca", ca,
                   "--out", tmp_path / "c.pem").returncode == 0


def _raw(text: str) -> bool:
    return "\x9b" in text or "\u202e" in text or "\x1b" in text


def test_names_with_c1_and_format_characters_are_refused(ca: Path, tmp_path: Path) -> None:
    """``ci-\\x9b31m\\u202eevil`` was signed and printed raw on the CA's terminal."""
    for name in (EVIL, "a\u200bb", "a\u2028b"):  # (the unit test below: every category)
        signed = jobd_ca("sign", csr(tmp_path / "evil.csr", name, "observe"), "--ca", ca,
                         "--out", tmp_path / "evil.pem")
        assert signed.returncode == 1, signed
        assert "must not contain control or format characters" in signed.stderr
        assert not _raw(signed.stderr) and len(signed.stderr.splitlines()) == 1
        assert not (tmp_path / "evil.pem").exists()
    requested = run(*JOBCTL, "cert", "request", "--name", EVIL, "--role", "observe",
                    "--out", tmp_path / "req")
    assert requested.returncode == 1, requested
    assert "control or format characters" in requested.stderr
    assert not _raw(requested.stderr)
    # names in other scripts are names
    assert jobd_ca("sign", csr(tmp_path / "zoe.csr", "Zoë Ünïcode", "observe"), "--ca", ca,
                   "--out", tmp_path / "zoe.pem").returncode == 0


@pytest.mark.parametrize("name", [EVIL, "a\u200bb", "a\u2066b", "a\u2028b", "a\x85b",
                                  "a\x1bb", "a\ufeffb", "a\U000e0001b"])
def test_check_name_refuses_controls_and_format_characters(name: str) -> None:
    from protocol._pki import PkiError, check_name

    with pytest.raises(PkiError, match="control or format characters"):
        check_name(name)
    assert check_name("Zoë O'Brien-李") == "Zoë O'Brien-李"


def test_ca_output_escapes_names_from_the_index(ca: Path, tmp_path: Path) -> None:
    """A certificate issued before names were checked (or an index edited by hand)
    is printed escaped by revoke."""
    signed = jobd_ca("sign", csr(tmp_path / "ci.csr", "ci-1", "observe"), "--ca", ca)
    assert signed.returncode == 0, signed.stderr
    entries = index(ca)
    entries[-1]["subject"] = f"CN={EVIL},OU=observe"
    (ca / "index.json").write_text(json.dumps({"certificates": entries}))
    revoked = jobd_ca("revoke", str(entries[-1]["serial"]), "--ca", ca)
    assert revoked.returncode == 0, revoked.stderr
    assert not _raw(revoked.stdout)
    assert "ci-\\x9b31m\\u202eevil" in revoked.stdout


def test_event_log_escapes_format_characters(pki: Pki, tmp_path: Path) -> None:
    """A CN with U+202E (from another CA, or issued before names were checked) was
    written raw into the event log; jobctl shows it escaped too."""
    leaf = client_leaf(pki.ca, common_name=EVIL + "\u200b", organization_unit_name="control")
    leaf.private_key_pem.write_to_path(str(tmp_path / "evil.key"))
    (tmp_path / "evil.key").chmod(0o600)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "evil.pem"))
    server = start_jobd(pki, tmp_path / "state")
    try:
        started = subprocess.run(
            [*JOBCTL, "-c", tmp_path / "evil.pem", "-k", tmp_path / "evil.key", "-C",
             pki.path("ca.pem"), "-a", server.address, "-p", str(server.port), "start",
             "true"], capture_output=True, timeout=60, cwd=RUN_CWD, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started
        line = server.wait_for_log(r"job-started ")
        assert "\u202e" not in line and "\x9b" not in line and "\u200b" not in line, line
        assert "\\u202e" in line and "\\u200b" in line, line
        listed = server.jobctl("root", "list")
        assert listed.returncode == 0, listed
        assert b"\\u202e" in listed.stdout and "\u202e".encode() not in listed.stdout
        assert "\u200b".encode() not in listed.stdout
    finally:
        server.stop()


# -- item 6: renewal -----------------------------------------------------------------


def test_expiry_warning_names_a_command_that_works(jobd: JobdProcess, tmp_path: Path) -> None:
    """The warning said "request a new one (jobctl cert request)", which refuses
    because the key exists."""
    now = datetime.datetime.now(datetime.UTC)
    leaf = client_leaf(jobd.pki.ca, common_name="carol", organization_unit_name="control",
                       not_after=now + datetime.timedelta(days=3))
    leaf.private_key_pem.write_to_path(str(tmp_path / "carol.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "carol.pem"))
    result = jobd.jobctl("alice", "list", extra=["-c", str(tmp_path / "carol.pem"), "-k",
                                                 str(tmp_path / "carol.key")])
    assert result.returncode == 0, result
    assert f"(jobctl cert renew {tmp_path / 'carol.pem'})" in result.stderr.decode()
    renewed = run(*JOBCTL, "cert", "renew", tmp_path / "carol.pem")
    assert renewed.returncode == 0, renewed.stderr


def test_renew_and_install(ca: Path, tmp_path: Path, pki: Pki) -> None:
    """``jobctl cert renew``: a new key and request beside the old ones (which keep
    working), swapped in by ``jobctl cert install``; or ``--reuse-key``."""
    home = tmp_path / "home"
    policy = ca / "policy.toml"
    policy.write_text(policy.read_text() + 'alice = ["control"]\n')
    assert run(*JOBCTL, "cert", "request", "--name", "alice", "--role", "control",
               "--out", home).returncode == 0
    assert jobd_ca("sign", home / "alice.csr", "--ca", ca).returncode == 0
    cert, key = home / "alice.pem", home / "alice.key"
    first_key = key.read_bytes()
    again = run(*JOBCTL, "cert", "request", "--name", "alice", "--role", "control",
                "--out", home)
    assert again.returncode == 1 and "exists" in again.stderr  # what the warning said
    renewed = run(*JOBCTL, "cert", "renew", cert)
    assert renewed.returncode == 0, renewed.stderr
    assert "jobctl cert install SIGNED" in renewed.stdout
    assert (home / "alice.new.key").stat().st_mode & 0o777 == 0o600
    assert key.read_bytes() == first_key  # the old pair keeps working meanwhile
    csr_subject = x509.load_pem_x509_csr((home / "alice.csr").read_bytes()).subject
    assert csr_subject.rfc4514_string() == "CN=alice,OU=control"
    twice = run(*JOBCTL, "cert", "renew", cert)
    assert twice.returncode == 1 and "a renewal is under way" in twice.stderr
    signed = jobd_ca("sign", home / "alice.csr", "--ca", ca, "--out", tmp_path / "new.pem")
    assert signed.returncode == 0, signed.stderr
    installed = run(*JOBCTL, "cert", "install", tmp_path / "new.pem", cert)
    assert installed.returncode == 0, installed.stderr
    assert cert.read_bytes() == (tmp_path / "new.pem").read_bytes()
    assert (home / "alice.old.key").read_bytes() == first_key
    assert not (home / "alice.new.key").exists()
    new = x509.load_pem_x509_certificate(cert.read_bytes())
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert new.public_key() == loaded.public_key()
    # --reuse-key: the same key, a new certificate
    kept = key.read_bytes()
    assert run(*JOBCTL, "cert", "renew", cert, "--reuse-key").returncode == 0
    assert not (home / "alice.new.key").exists()
    assert jobd_ca("sign", home / "alice.csr", "--ca", ca, "--out", tmp_path / "again.pem"
                   ).returncode == 0
    installed = run(*JOBCTL, "cert", "install", tmp_path / "again.pem", cert)
    assert installed.returncode == 0 and "(the same key)" in installed.stdout
    assert key.read_bytes() == kept
    # a certificate for someone else's key is refused
    other = run(*JOBCTL, "cert", "install", pki.path("alice.pem"), cert)
    assert other.returncode == 1 and "neither" in other.stderr
