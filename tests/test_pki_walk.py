"""A new operator's whole walk with jobd and jobctl commands alone (docs/security.md):
a CA, a server certificate, a client who requests her own, a policy that allows
and denies, a revocation that a SIGHUP applies, a pinned server and a server
whose certificate changed."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import select
import shutil
import signal
import ssl
import stat
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .conftest import JOBCTL, JOBD, PYTHON, RUN_CWD, JobdProcess, Pki, client_leaf, start_jobd


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=RUN_CWD,
                          env=env, stdin=subprocess.DEVNULL)


def jobd_cmd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([*JOBD, *map(str, args)])


def client_env(home: Path) -> dict[str, str]:
    """A clean client: its own config directory, no JOBCTL_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env["XDG_CONFIG_HOME"] = str(home)
    return env


def jobctl(env: dict[str, str], who: Path, port: int, *args: str
           ) -> subprocess.CompletedProcess[str]:
    return run([*JOBCTL, "-c", f"{who}.pem", "-k", f"{who}.key", "-a", "127.0.0.1",
                "-p", str(port), *args], env)


def sign(ca: Path, csr: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return jobd_cmd("ca", "sign", csr, "--ca", ca, *extra)


def fingerprint_printed(result: subprocess.CompletedProcess[str]) -> str:
    m = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", result.stdout)
    assert m, result.stdout
    return m.group(1)


def test_operator_walk(tmp_path: Path) -> None:
    ca, srv, home = tmp_path / "ca", tmp_path / "srv", tmp_path / "home"

    # 1. The CA: key private, a policy that allows nobody, an empty CRL.
    made = jobd_cmd("ca", "init", ca)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    assert "[clients]" in (ca / "policy.toml").read_text()
    assert jobd_cmd("ca", "init", ca).returncode == 1  # never replaced by accident

    # 2. The server makes its key and request; the CA signs it for its names.
    assert jobd_cmd("cert", "request", "--name", "server", "--out", srv).returncode == 0
    signed = sign(ca, srv / "server.csr", "--server", "--san", "127.0.0.1", "localhost")
    assert signed.returncode == 0, signed.stderr
    server_fp = fingerprint_printed(signed)
    server_cert = x509.load_pem_x509_certificate((srv / "server.pem").read_bytes())
    assert server_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value \
        == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])

    # 3. Alice makes her own key and request (default: her config directory).
    alice_env = client_env(home)
    req = run([*JOBCTL, "cert", "request", "--name", "alice", "--role", "control"], alice_env)
    assert req.returncode == 0, req.stderr
    alice = home / "jobctl" / "alice"
    assert stat.S_IMODE(alice.with_suffix(".key").stat().st_mode) == 0o600
    csr = alice.with_suffix(".csr")

    # 4. The policy decides: nobody yet, then observe only, then control.
    denied = sign(ca, csr)
    assert denied.returncode == 1
    assert "allows no client named 'alice'" in denied.stderr
    policy = ca / "policy.toml"
    policy.write_text(policy.read_text() + 'alice = ["observe"]\n"ci-*" = ["observe"]\n')
    denied = sign(ca, csr)
    assert denied.returncode == 1
    assert "lets 'alice' hold observe, not control" in denied.stderr
    assert not alice.with_suffix(".pem").exists()
    policy.write_text(policy.read_text().replace('alice = ["observe"]', 'alice = ["control"]'))
    ok = sign(ca, csr)
    assert ok.returncode == 0, ok.stderr
    cert = x509.load_pem_x509_certificate(alice.with_suffix(".pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=alice,OU=control"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value \
        == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 29 <= lifetime.days <= 31  # short by default

    # Bob too (he will lose his certificate), through a glob pattern.
    bob_dir = tmp_path / "bob"
    assert run([*JOBCTL, "cert", "request", "--name", "ci-bob", "--role", "observe",
                "--out", str(bob_dir)]).returncode == 0
    assert sign(ca, bob_dir / "ci-bob.csr").returncode == 0
    bob = bob_dir / "ci-bob"

    # 5. jobd with those files and the CA's CRL; alice verifies it against the CA.
    pki = Pki(srv, None)  # type: ignore[arg-type]
    shutil.copy(ca / "ca.pem", srv / "ca.pem")
    server = start_jobd(pki, tmp_path / "state", "--crl", str(ca / "crl.pem"))
    try:
        port = server.port
        with_ca = ("-C", str(ca / "ca.pem"))
        started = jobctl(alice_env, alice, port, *with_ca, "start", "true")
        assert started.returncode == 0, started.stderr
        assert jobctl(alice_env, bob, port, *with_ca, "list").returncode == 0

        # 6. Bob's certificate is revoked; a SIGHUP applies the new CRL.
        revoked = jobd_cmd("ca", "revoke", f"{bob}.pem", "--ca", ca)
        assert revoked.returncode == 0, revoked.stderr
        assert jobd_cmd("ca", "crl", "--ca", ca).returncode == 0
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"info reloaded ")
        refused = jobctl(alice_env, bob, port, *with_ca, "list")
        assert refused.returncode == 3, refused.stderr
        server.wait_for_log(r"connection-refused .*revoked")
        assert jobctl(alice_env, alice, port, *with_ca, "list").returncode == 0

        # 7. Trust on first use: no CA configured anywhere.
        unknown = jobctl(alice_env, alice, port, "list")
        assert unknown.returncode == 3
        assert server_fp in unknown.stderr and "--trust-on-first-use" in unknown.stderr
        known = home / "jobctl" / "known_servers"
        assert not known.exists()
        pinned = jobctl(alice_env, alice, port, "--trust-on-first-use", "list")
        assert pinned.returncode == 0, pinned.stderr
        assert known.read_text() == f"[127.0.0.1]:{port} {server_fp}\n"
        again = jobctl(alice_env, alice, port, "start", "true")
        assert again.returncode == 0, again.stderr
        assert "trusting" not in again.stderr
    finally:
        server.stop()

    # 8. The same address and port, another certificate: refused loudly, pin kept.
    assert jobd_cmd("cert", "request", "--name", "server2", "--out", srv).returncode == 0
    other = sign(ca, srv / "server2.csr", "--server", "--san", "127.0.0.1", "--days", "10")
    other_fp = fingerprint_printed(other)
    impostor = start_jobd(pki, tmp_path / "state2", "--log-level", "debug", port=port,
                          server="server2")
    try:
        # jobd's own certificate expires within 14 days: it says so.
        impostor.wait_for_log(r"warning certificate-expiring which=certificate")
        before = known.read_bytes()
        for extra in ([], ["--trust-on-first-use"]):
            changed = jobctl(alice_env, alice, port, *extra, "start", "true")
            assert changed.returncode == 3
            assert "HAS CHANGED" in changed.stderr
            assert server_fp in changed.stderr and other_fp in changed.stderr
            assert f"{known}:1" in changed.stderr
            assert known.read_bytes() == before
        # Nothing was sent: no hello, so no identity reached jobd's log...
        assert "alice" not in impostor.log_text()
        # ...where a connection that gets as far as the hello does show it.
        assert jobctl(alice_env, alice, port, "-C", str(ca / "ca.pem"), "list").returncode == 0
        impostor.wait_for_log(r"connected .*who=alice")
    finally:
        impostor.stop()


def test_client_warns_before_its_certificate_expires(jobd: JobdProcess, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for name, days in (("carol", 3), ("dave", 30)):
        leaf = client_leaf(jobd.pki.ca, common_name=name, organization_unit_name="control",
                           not_after=now + datetime.timedelta(days=days))
        leaf.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
    args = ["-c", str(tmp_path / "carol.pem"), "-k", str(tmp_path / "carol.key")]
    result = jobd.jobctl("alice", "list", extra=args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"carol\.pem expires in [23] days", result.stderr.decode()), result.stderr
    args = ["-c", str(tmp_path / "dave.pem"), "-k", str(tmp_path / "dave.key")]
    result = jobd.jobctl("alice", "list", extra=args)
    assert result.returncode == 0 and result.stderr == b""


def test_sign_refuses_what_the_ca_must_not_sign(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert jobd_cmd("ca", "init", ca).returncode == 0
    (ca / "policy.toml").write_text('[clients]\n"*" = ["observe"]\n')
    # A server request (no OU) is no client request.
    assert jobd_cmd("cert", "request", "--name", "web", "--out", tmp_path).returncode == 0
    no_role = sign(ca, tmp_path / "web.csr")
    assert no_role.returncode == 1 and "has no OU (role)" in no_role.stderr
    assert "sign with --server --san NAME" in no_role.stderr  # issue 23: the hint
    # --server without --san, and junk instead of a request.
    assert "needs --san" in sign(ca, tmp_path / "web.csr", "--server").stderr
    junk = tmp_path / "junk.csr"
    junk.write_text("not a request\n")
    assert "not a certificate signing request" in sign(ca, junk).stderr
    # A policy with a typo is an error naming the file, not a silent allow.
    (ca / "policy.toml").write_text('[clients]\nalice = ["contrl"]\n')
    assert run([*JOBCTL, "cert", "request", "--name", "alice", "--role", "control",
                "--out", str(tmp_path)]).returncode == 0
    typo = sign(ca, tmp_path / "alice.csr")
    assert typo.returncode == 1 and "unknown role 'contrl'" in typo.stderr
    # Unknown serials are not revoked silently.
    bad = jobd_cmd("ca", "revoke", "abcdef", "--ca", ca)
    assert bad.returncode == 1 and "not issued by this CA" in bad.stderr
    # A damaged index is an error, not a traceback.
    (ca / "index.json").write_text('{"certificates": [{"serial": "zz"}]}')
    damaged = jobd_cmd("ca", "crl", "--ca", ca)
    assert damaged.returncode == 1 and "is not a jobd CA index" in damaged.stderr
    assert "Traceback" not in damaged.stderr


def _pty_jobctl(jobd: JobdProcess, env: dict[str, str], answer: bytes, *args: str
                ) -> tuple[int, str]:
    """jobctl on a terminal (a pty): answer its question, return its status and screen."""
    master, slave = os.openpty()
    cmd = [*JOBCTL, *jobd.pki.client_args("alice")[:4], "-a", jobd.address,
           "-p", str(jobd.port), *args]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=RUN_CWD, env=env)
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 60
    answered = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            assert ready, f"jobctl said nothing more: {screen!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"(yes/no)? " in screen:
                os.write(master, answer + b"\n")
                answered = True
        return proc.wait(30), screen.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tofu_asks_on_a_terminal(jobd: JobdProcess, tmp_path: Path) -> None:
    env = client_env(tmp_path)
    der = ssl.PEM_cert_to_DER_cert(Path(jobd.pki.path("server.pem")).read_text())
    fp = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    known = tmp_path / "jobctl" / "known_servers"

    status, screen = _pty_jobctl(jobd, env, b"no", "list")
    assert status == 3
    assert f"fingerprint is {fp}" in screen and "not trusted" in screen
    assert not known.exists()

    status, screen = _pty_jobctl(jobd, env, b"yes", "start", "true")
    assert status == 0, screen
    assert re.search(r"pinned server \[127\.0\.0\.1\]:\d+ in .*known_servers:1", screen)
    assert known.read_text() == f"[127.0.0.1]:{jobd.port} {fp}\n"
    # Pinned: no question the second time.
    again = jobd.jobctl("alice", "list", extra=["-C", ""], env=env)
    assert again.returncode == 0, again.stderr


def test_jobd_help_names_the_ca_commands() -> None:
    result = jobd_cmd("--help")
    assert result.returncode == 0 and "jobd ca" in result.stdout


def test_without_the_ca_extra_the_commands_say_what_to_install(tmp_path: Path) -> None:
    """cryptography missing (an install without jobd[ca]): one clear line, exit 1."""
    for module, args in (("jobd.__main__", ["ca", "init", str(tmp_path / "ca")]),
                         ("jobctl._cli", ["cert", "request", "--name", "a", "--role", "observe",
                                          "--out", str(tmp_path)])):
        code = ("import sys; sys.modules['cryptography'] = None\n"
                f"from {module} import main\nsys.exit(main({args!r}))")
        result = run([PYTHON, "-c", code])
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().endswith("needs the cryptography library: "
                                              "pip install 'jobd[ca]'")
        assert not list(tmp_path.iterdir())


def test_a_self_made_server_certificate_without_eku_can_be_pinned(pki: Pki,
                                                                  tmp_path: Path) -> None:
    """`openssl req -x509` style: self-signed, no EKU. With a CA, jobctl wants serverAuth;
    pinned, the pin names the exact certificate and is all that is checked."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "selfmade")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    d = tmp_path / "pki"
    shutil.copytree(pki.dir, d)
    (d / "selfmade.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "selfmade.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "selfmade.key").chmod(0o600)
    server = start_jobd(Pki(d, pki.ca), tmp_path / "state", server="selfmade")
    try:
        env = client_env(tmp_path / "home")
        alice = d / "alice"
        with_ca = jobctl(env, alice, server.port, "-C", str(d / "selfmade.pem"), "list")
        assert with_ca.returncode == 3 and "serverAuth" in with_ca.stderr
        pinned = jobctl(env, alice, server.port, "--trust-on-first-use", "list")
        assert pinned.returncode == 0, pinned.stderr
        assert jobctl(env, alice, server.port, "start", "true").returncode == 0
    finally:
        server.stop()
