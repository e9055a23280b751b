"""Which PEM file is which: a clear reason when a certificate or key will not
load. OpenSSL only says ``[SSL] PEM lib`` for a key given as the certificate
(or the other way round); this looks at the files' PEM labels. Shared by
jobctl and jobd, below both (as ``_pki`` is); no ssl here."""

from __future__ import annotations

import os

#: Read at most this much of a file to find its labels (certificates are small).
MAX_PEM = 1 << 20


def _labels(path: str | os.PathLike[str]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PEM)
    except OSError:
        return None


def mismatch(certificate: str | os.PathLike[str], key: str | os.PathLike[str]) -> str | None:
    """Why these files cannot be a certificate and its key, if their labels tell."""
    cert, private = _labels(certificate), _labels(key)
    if cert is not None and b"-----BEGIN CERTIFICATE-----" not in cert:
        if b"PRIVATE KEY-----" in cert:
            return (f"{os.fspath(certificate)} holds a private key, not a certificate "
                    "(certificate and key swapped?)")
        return f"{os.fspath(certificate)} is not a PEM certificate"
    if private is not None and b"PRIVATE KEY-----" not in private:
        if b"-----BEGIN CERTIFICATE-----" in private:
            return (f"{os.fspath(key)} holds a certificate, not a private key "
                    "(certificate and key swapped?)")
        return f"{os.fspath(key)} is not a PEM private key"
    return None
