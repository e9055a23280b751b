"""Keys, requests, certificates and revocation lists, with ``cryptography``.

Theory of operation
-------------------
Everything X.509 that ``jobd ca`` and ``jobctl cert`` do goes through this
module, and this module is the only one that imports ``cryptography`` (the
optional extra ``jobd[ca]``). It is imported by those commands alone: the
daemon and jobctl's other commands never pay for it, and ``protocol``'s
``__init__`` does not import it. It lives in ``protocol`` because both sides
use it (``jobctl cert request`` writes a key and a request as ``jobd ca``
does) and jobd and jobctl never import each other.

A CA directory holds::

    ca.key        the CA's private key (0600)
    ca.pem        the CA certificate
    policy.toml   which client names may hold which roles (read by ``sign``)
    index.json    every certificate issued: serial, subject, expiry, revocation
    crl.pem       the revocation list that ``jobd --crl`` reads

Issued certificates never copy a request's extensions: a request only
proposes a public key and a subject, and the CA decides everything else
(basicConstraints CA:FALSE, keyUsage, the one EKU, the SANs it was told).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("observe", "control", "admin")
#: RFC 5280's upper bound for a common name; also keeps log lines sane.
MAX_NAME = 64
#: Leeway for clocks that run a little behind the CA's.
BACKDATE = datetime.timedelta(minutes=5)
#: The curves TLS 1.3 signs with (RFC 8446 4.2.3); secp256k1 and friends are not.
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
#: A CSR or certificate file larger than this is not a CSR or certificate.
MAX_PEM_FILE = 64 * 1024


class PkiError(Exception):
    """An operation cannot be done; ``str()`` is the one-line reason."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- files ---------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (a reader sees the old file or the new one), the new
    file created with ``mode`` from birth."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, mode 0600 from birth (never world-readable)."""
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, mode 0644."""
    _write_atomic(path, data, 0o644)


def read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_FILE + 1)
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_FILE:
        raise PkiError(f"{what} {path} is larger than {MAX_PEM_FILE} bytes")
    return data


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as ``openssl x509 -fingerprint -sha256`` prints it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def check_name(name: str, what: str = "name") -> str:
    if not name or len(name) > MAX_NAME:
        raise PkiError(f"{what} must be 1 to {MAX_NAME} characters: {name!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise PkiError(f"{what} must not contain control characters: {name!r}")
    return name


# -- requests (jobctl cert request, jobd cert request) --------------------------


def write_request(directory: Path, name: str, role: str | None) -> tuple[Path, Path]:
    """A new P-256 key (0600) and a CSR with CN=name (and OU=role) in ``directory``.

    Refuses to replace an existing key: it may be the one a certificate was
    issued for.
    """
    check_name(name)
    if role is not None and role not in ROLES:
        raise PkiError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")
    if "/" in name or name in (".", ".."):
        raise PkiError(f"name must not contain '/': {name!r}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, csr_path = directory / f"{name}.key", directory / f"{name}.csr"
    if key_path.exists():
        raise PkiError(f"{key_path} exists; remove it first to make a new key")
    key = new_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)] if role else []
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name(attrs))
           .sign(key, hashes.SHA256()))
    write_private(key_path, key_pem(key))
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


# -- the CA --------------------------------------------------------------------


@dataclass
class CA:
    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, directory: Path) -> CA:
        key_data = read_small(directory / "ca.key", "CA key")
        cert_data = read_small(directory / "ca.pem", "CA certificate")
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
            cert = x509.load_pem_x509_certificate(cert_data)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"cannot load the CA in {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory}/ca.key is not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise PkiError(f"{directory}/ca.key does not belong to {directory}/ca.pem")
        return cls(directory, key, cert)

    # -- index -------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def index(self) -> list[dict[str, Any]]:
        try:
            text = self.index_path.read_text()
        except FileNotFoundError:
            return []
        try:
            entries = json.loads(text)["certificates"]
        except (ValueError, KeyError, TypeError):
            raise PkiError(f"{self.index_path} is not a jobd CA index") from None
        if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries):
            raise PkiError(f"{self.index_path} is not a jobd CA index")
        return entries

    def save_index(self, entries: list[dict[str, Any]]) -> None:
        write_public(self.index_path,
                     (json.dumps({"certificates": entries}, indent=1) + "\n").encode())

    # -- issuing -----------------------------------------------------------------

    def issue(self, csr: x509.CertificateSigningRequest, *, days: int, server: bool,
              sans: Sequence[str]) -> x509.Certificate:
        cn = single(csr.subject, NameOID.COMMON_NAME, "CN")
        if server:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            role = single(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
            subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        start = now()
        end = start + datetime.timedelta(days=days)
        if end > self.cert.not_valid_after_utc:
            raise PkiError(f"the certificate would outlive the CA (which expires "
                           f"{self.cert.not_valid_after_utc:%Y-%m-%d}): use fewer --days")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):  # load_csr checked it
            raise PkiError("the request's key is not an ECDSA key")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([general_name(s) for s in sans]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        entries = self.index()
        entries.append({
            "serial": f"{cert.serial_number:x}",
            "subject": cert.subject.rfc4514_string(),
            "kind": "server" if server else "client",
            "not_after": cert.not_valid_after_utc.isoformat(),
            "revoked": None,
        })
        self.save_index(entries)
        return cert

    # -- revocation --------------------------------------------------------------

    def revoke(self, serial: int) -> dict[str, Any]:
        entries = self.index()
        for entry in entries:
            if int(entry["serial"], 16) == serial:
                if entry.get("revoked"):
                    raise PkiError(f"serial {serial:x} ({entry['subject']}) is already revoked")
                entry["revoked"] = now().isoformat()
                self.save_index(entries)
                return entry
        raise PkiError(f"serial {serial:x} was not issued by this CA "
                       f"(not in {self.index_path})")

    def write_crl(self, days: int) -> tuple[Path, int]:
        """Write ``crl.pem`` from the index; return its path and how many it revokes."""
        start = now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.cert.subject)
                   .last_update(start - BACKDATE)
                   .next_update(start + datetime.timedelta(days=days)))
        count = 0
        for entry in self.index():
            if not entry.get("revoked"):
                continue
            revoked = (x509.RevokedCertificateBuilder()
                       .serial_number(int(entry["serial"], 16))
                       .revocation_date(datetime.datetime.fromisoformat(entry["revoked"]))
                       .build())
            builder = builder.add_revoked_certificate(revoked)
            count += 1
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.dir / "crl.pem"
        write_public(path, crl.public_bytes(serialization.Encoding.PEM))
        return path, count


def _valid_entry(entry: Any) -> bool:
    """An index entry as ``issue`` writes it (a hand-edited index is checked, not trusted)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("serial"), str):
        return False
    try:
        int(entry["serial"], 16)
        revoked = entry.get("revoked")
        if revoked is not None:
            datetime.datetime.fromisoformat(revoked)
    except (ValueError, TypeError):
        return False
    return True


def init_ca(directory: Path, *, name: str, days: int) -> CA:
    """A new self-signed P-256 CA in ``directory`` (which must not hold one yet)."""
    check_name(name, "CA name")
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(directory / "ca.key", key_pem(key))
    write_public(directory / "ca.pem", cert_pem(cert))
    return CA(directory, key, cert)


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    data = read_small(path, "request")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        try:
            csr = x509.load_der_x509_csr(data)
        except ValueError:
            raise PkiError(f"{path} is not a certificate signing request (PEM or DER)") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise PkiError(f"{path}: the request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise PkiError(f"{path}: the key must be ECDSA on P-256, P-384 or P-521 "
                       "(make it with `jobctl cert request`)")
    return csr


def load_cert(path: Path) -> x509.Certificate:
    data = read_small(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate") from None


def single(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    values = [a.value for a in name.get_attributes_for_oid(oid)]
    if len(values) != 1:
        raise PkiError(f"the request must have exactly one {label}, it has {len(values)}")
    value = values[0]
    if not isinstance(value, str):
        raise PkiError(f"the request's {label} is not text")
    return check_name(value, label)


def general_name(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.split(".")
    if (not text or len(text) > 253
            or not all(label and len(label) <= 63 and label.replace("-", "").replace("*", "")
                       .isalnum() and label.isascii() for label in labels)):
        raise PkiError(f"--san {text!r} is neither an IP address nor a DNS name")
    return x509.DNSName(text)
