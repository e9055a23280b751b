"""The two certificate fields jobd and jobctl read themselves: extended key usage
and the end of validity (notAfter).

Python's ``ssl`` verifies the chain with OpenSSL's default purpose (an SSL
client certificate on the server side, an SSL server certificate on the client
side). That check rejects a certificate whose extended key usage (EKU) lists
other purposes only, but OpenSSL takes a certificate *without* the extension
as good for every purpose, and ``ssl`` exposes neither ``X509_PURPOSE`` nor the
extension itself (``getpeercert()`` omits it). So both sides read the verified
peer certificate's DER (``getpeercert(binary_form=True)``) and look for the
extension here: a walk through the few DER elements that lead to it, no
general ASN.1 decoder.

The expiry warnings of jobd (its certificate and CA) and jobctl (its client
certificate) need notAfter, which sits earlier on the same path (validity).
``ssl`` decodes it only through a private CPython function, and
``cryptography`` costs jobctl's start-up and the daemon an optional extra:
:func:`pem_not_after` reads it here from the file's first certificate.

Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, ... }
TBSCertificate ::= SEQUENCE { [0] version, serial, signature, issuer, validity,
    subject, subjectPublicKeyInfo, [1] issuerUID, [2] subjectUID,
    [3] EXPLICIT SEQUENCE OF Extension }
Validity ::= SEQUENCE { notBefore Time, notAfter Time }
Time ::= CHOICE { utcTime UTCTime (YYMMDDHHMMSSZ), generalTime GeneralizedTime
    (YYYYMMDDHHMMSSZ) }   -- RFC 5280 4.1.2.5: UTCTime through 2049
Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE,
    extnValue OCTET STRING (holding, for EKU, a SEQUENCE OF OID) }
"""

from __future__ import annotations

import binascii
import os

#: id-ce-extKeyUsage (2.5.29.37).
EXTENDED_KEY_USAGE = "2.5.29.37"
#: id-kp-serverAuth and id-kp-clientAuth (RFC 5280 §4.2.1.12).
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"

_SEQUENCE = 0x30
_OID = 0x06
_INTEGER = 0x02
_BOOLEAN = 0x01
_OCTET_STRING = 0x04
_EXTENSIONS = 0xA3  # [3] EXPLICIT, constructed
_VERSION = 0xA0  # [0] EXPLICIT, constructed
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
#: A certificate file larger than this is not read for its date (a chain of a
#: few certificates is a few KiB).
MAX_PEM_BYTES = 1 << 20
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
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


def _tbs(der: bytes, what: str = "certificate",
         tbs_name: str = "tbsCertificate") -> tuple[int, int]:
    """Where the value of a signed structure's first field lies (a certificate's
    tbsCertificate, a CRL's tbsCertList). Raises CertificateFormatError."""
    tag, start, end = _element(der, 0, len(der))
    if tag != _SEQUENCE:
        raise CertificateFormatError(f"not a {what}")
    fields = _children(der, start, end)
    if not fields or fields[0][0] != _SEQUENCE:
        raise CertificateFormatError(f"no {tbs_name}")
    return fields[0][1], fields[0][2]


def _tbs_fields(der: bytes) -> list[tuple[int, int, int]]:
    """The elements of the certificate's tbsCertificate."""
    return _children(der, *_tbs(der))


def extended_key_usage(der: bytes) -> frozenset[str] | None:
    """The purposes (dotted OIDs) the certificate's EKU extension lists, or None
    when it has no such extension. Raises CertificateFormatError on malformed DER."""
    for tag, value, value_end in _tbs_fields(der):
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


def _raw_children(der: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Like :func:`_children`, with each element's own start: (tag, element start,
    value start, value end)."""
    out = []
    while start < end:
        tag, value, value_end = _element(der, start, end)
        out.append((tag, start, value, value_end))
        start = value_end
    return out


def _integer(raw: bytes) -> int:
    if not raw:
        raise CertificateFormatError("empty integer")
    return int.from_bytes(raw, "big", signed=True)


def issuer_and_serial(der: bytes) -> tuple[bytes, int]:
    """The certificate's issuer (the DER of its Name, compared byte for byte) and
    serial number: what a CRL names it by. Raises CertificateFormatError."""
    tbs = _raw_children(der, *_tbs(der))
    if tbs and tbs[0][0] == _VERSION:
        tbs = tbs[1:]
    # serial, signature, issuer
    if len(tbs) < 3 or tbs[0][0] != _INTEGER or tbs[2][0] != _SEQUENCE:
        raise CertificateFormatError("no serial or issuer")
    return der[tbs[2][1]:tbs[2][3]], _integer(der[tbs[0][2]:tbs[0][3]])


def crl_revocations(der: bytes) -> tuple[bytes, frozenset[int]]:
    """A CRL's issuer (DER of its Name) and the serial numbers it revokes. The
    signature is not checked here: OpenSSL checks it for new connections, and a CRL
    file only ever revokes (jobd/_tls.py). Raises CertificateFormatError.

    CertificateList ::= SEQUENCE { tbsCertList SEQUENCE { version INTEGER OPTIONAL,
        signature, issuer Name, thisUpdate Time, nextUpdate Time OPTIONAL,
        revokedCertificates SEQUENCE OF SEQUENCE { userCertificate INTEGER, ... }
        OPTIONAL, [0] crlExtensions OPTIONAL }, signatureAlgorithm, signature }
    """
    tbs = _raw_children(der, *_tbs(der, "CRL", "tbsCertList"))
    if tbs and tbs[0][0] == _INTEGER:
        tbs = tbs[1:]
    if len(tbs) < 3 or tbs[0][0] != _SEQUENCE or tbs[1][0] != _SEQUENCE:
        raise CertificateFormatError("no issuer")
    issuer = der[tbs[1][1]:tbs[1][3]]
    rest = tbs[3:]  # after thisUpdate
    if rest and rest[0][0] in (_UTC_TIME, _GENERALIZED_TIME):
        rest = rest[1:]
    serials: set[int] = set()
    if rest and rest[0][0] == _SEQUENCE:
        for entry_tag, entry_start, entry_end in _children(der, rest[0][2], rest[0][3]):
            entry = _children(der, entry_start, entry_end) if entry_tag == _SEQUENCE else []
            if not entry or entry[0][0] != _INTEGER:
                raise CertificateFormatError("bad revoked entry")
            serials.add(_integer(der[entry[0][1]:entry[0][2]]))
    return issuer, frozenset(serials)


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


def not_after(der: bytes) -> float:
    """The end of the certificate's validity, in seconds since the Unix epoch.
    Raises CertificateFormatError on malformed DER."""
    return validity(der)[1]


def validity(der: bytes) -> tuple[float, float]:
    """The certificate's (notBefore, notAfter), in seconds since the Unix epoch.
    Raises CertificateFormatError on malformed DER."""
    fields = _tbs_fields(der)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serial, signature, issuer, validity
    if len(fields) < 4 or fields[3][0] != _SEQUENCE:
        raise CertificateFormatError("no validity")
    dates = _children(der, fields[3][1], fields[3][2])
    if len(dates) != 2:
        raise CertificateFormatError("bad validity")
    (tag0, start0, end0), (tag1, start1, end1) = dates
    return _time(tag0, der[start0:end0]), _time(tag1, der[start1:end1])


def _time(tag: int, raw: bytes) -> float:
    """A UTCTime or GeneralizedTime in the one form RFC 5280 allows (UTC, with
    seconds, no fraction), as Unix time."""
    if tag == _UTC_TIME and len(raw) == 13:
        year = int(raw[:2]) if raw[:2].isdigit() else -1
        year += 1900 if year >= 50 else 2000
        digits = raw[2:12]
    elif tag == _GENERALIZED_TIME and len(raw) == 15:
        year = int(raw[:4]) if raw[:4].isdigit() else -1
        digits = raw[4:14]
    else:
        raise CertificateFormatError("bad time")
    if raw[-1:] != b"Z" or not digits.isdigit() or year < 0:
        raise CertificateFormatError("bad time")
    month, day, hour, minute, second = (int(digits[i:i + 2]) for i in range(0, 10, 2))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60
            and second < 60):
        raise CertificateFormatError("bad time")
    days = _days_from_civil(year, month, day)
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm);
    computed here because importing datetime costs jobctl's every run."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def first_certificate(pem: bytes) -> bytes:
    """The DER of the first certificate in PEM text. Raises CertificateFormatError."""
    begin = pem.find(_PEM_BEGIN)
    end = pem.find(_PEM_END, begin + 1)
    if begin < 0 or end < 0:
        raise CertificateFormatError("no certificate")
    try:
        return binascii.a2b_base64(pem[begin + len(_PEM_BEGIN):end])
    except binascii.Error:
        raise CertificateFormatError("bad base64 in the certificate") from None


def utc(when: float) -> str:
    """A Unix time as ``2026-12-07 18:00 UTC`` (without importing datetime, which
    costs jobctl's every run)."""
    days, rest = divmod(int(when), 86400)
    days += 719468  # the inverse of _days_from_civil (H. Hinnant's algorithm)
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    return f"{year:04d}-{month:02d}-{day:02d} {rest // 3600:02d}:{rest % 3600 // 60:02d} UTC"


def pem_validity(path: str | os.PathLike[str]) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the first certificate in the PEM file at ``path``, or
    None when the file cannot be read or holds no readable certificate."""
    try:
        with open(path, "rb") as file:
            pem = file.read(MAX_PEM_BYTES)
        return validity(first_certificate(pem))
    except (OSError, CertificateFormatError):
        return None


def pem_not_after(path: str | os.PathLike[str]) -> float | None:
    """The notAfter of the first certificate in the PEM file at ``path`` (Unix time),
    or None when the file cannot be read or holds no readable certificate."""
    try:
        with open(path, "rb") as file:
            pem = file.read(MAX_PEM_BYTES)
        return not_after(first_certificate(pem))
    except (OSError, CertificateFormatError):
        return None
