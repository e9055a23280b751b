"""The one certificate field jobd and jobctl read themselves: extended key usage.

Python's ``ssl`` verifies the chain with OpenSSL's default purpose (an SSL
client certificate on the server side, an SSL server certificate on the client
side). That check rejects a certificate whose extended key usage (EKU) lists
other purposes only, but OpenSSL takes a certificate *without* the extension
as good for every purpose, and ``ssl`` exposes neither ``X509_PURPOSE`` nor the
extension itself (``getpeercert()`` omits it). So both sides read the verified
peer certificate's DER (``getpeercert(binary_form=True)``) and look for the
extension here: a walk through the few DER elements that lead to it, no
general ASN.1 decoder.

Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, ... }
TBSCertificate ::= SEQUENCE { [0] version, serial, signature, issuer, validity,
    subject, subjectPublicKeyInfo, [1] issuerUID, [2] subjectUID,
    [3] EXPLICIT SEQUENCE OF Extension }
Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE,
    extnValue OCTET STRING (holding, for EKU, a SEQUENCE OF OID) }
"""

from __future__ import annotations

#: id-ce-extKeyUsage (2.5.29.37).
EXTENDED_KEY_USAGE = "2.5.29.37"
#: id-kp-serverAuth and id-kp-clientAuth (RFC 5280 §4.2.1.12).
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"

_SEQUENCE = 0x30
_OID = 0x06
_BOOLEAN = 0x01
_OCTET_STRING = 0x04
_EXTENSIONS = 0xA3  # [3] EXPLICIT, constructed
#: Certificates are small; a length field of more than 4 bytes is malformed here.
_MAX_LENGTH_BYTES = 4


class CertificateFormatError(ValueError):
    """The DER does not have the shape of an X.509 certificate."""


def _element(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """The element at ``at``: (tag, start of its value, end of its value)."""
    if at + 2 > end:
        raise CertificateFormatError("truncated element")
    tag = der[at]
    if tag & 0x1F == 0x1F:
        raise CertificateFormatError("high tag numbers do not occur in a certificate")
    length = der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= _MAX_LENGTH_BYTES or at + count > end:
            raise CertificateFormatError("bad length")
        length = int.from_bytes(der[at:at + count], "big")
        at += count
    if at + length > end:
        raise CertificateFormatError("element longer than its container")
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, value, value_end = _element(der, start, end)
        out.append((tag, value, value_end))
        start = value_end
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise CertificateFormatError("empty object identifier")
    arcs: list[int] = []
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if raw[-1] & 0x80:
        raise CertificateFormatError("truncated object identifier")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def extended_key_usage(der: bytes) -> frozenset[str] | None:
    """The purposes (dotted OIDs) the certificate's EKU extension lists, or None
    when it has no such extension. Raises CertificateFormatError on malformed DER."""
    tag, start, end = _element(der, 0, len(der))
    if tag != _SEQUENCE:
        raise CertificateFormatError("not a certificate")
    fields = _children(der, start, end)
    if not fields or fields[0][0] != _SEQUENCE:
        raise CertificateFormatError("no tbsCertificate")
    _, tbs_start, tbs_end = fields[0]
    for tag, value, value_end in _children(der, tbs_start, tbs_end):
        if tag != _EXTENSIONS:
            continue
        inner = _children(der, value, value_end)
        if len(inner) != 1 or inner[0][0] != _SEQUENCE:
            raise CertificateFormatError("bad extensions")
        for ext_tag, ext_start, ext_end in _children(der, inner[0][1], inner[0][2]):
            if ext_tag != _SEQUENCE:
                raise CertificateFormatError("bad extension")
            parts = _children(der, ext_start, ext_end)
            if not parts or parts[0][0] != _OID:
                raise CertificateFormatError("extension without an identifier")
            if _oid(der[parts[0][1]:parts[0][2]]) != EXTENDED_KEY_USAGE:
                continue
            rest = [part for part in parts[1:] if part[0] != _BOOLEAN]
            if len(rest) != 1 or rest[0][0] != _OCTET_STRING:
                raise CertificateFormatError("bad extended key usage extension")
            seq_tag, seq_start, seq_end = _element(der, rest[0][1], rest[0][2])
            if seq_tag != _SEQUENCE:
                raise CertificateFormatError("bad extended key usage extension")
            usages = _children(der, seq_start, seq_end)
            if any(t != _OID for t, _, _ in usages):
                raise CertificateFormatError("bad extended key usage extension")
            return frozenset(_oid(der[s:e]) for _, s, e in usages)
    return None


def allows(der: bytes | None, purpose: str) -> bool:
    """Does the certificate's EKU extension list ``purpose``? False without the
    extension, and for DER that is not a certificate."""
    if not der:
        return False
    try:
        usages = extended_key_usage(der)
    except CertificateFormatError:
        return False
    return usages is not None and purpose in usages
