"""Expiry dates read without cryptography, and when jobd's warnings are due."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from jobd._expiry import REPEAT_SECONDS, expiry_warnings
from protocol._x509 import CertificateFormatError, _time, first_certificate
from protocol._x509 import not_after as der_not_after_walk
from protocol._x509 import pem_not_after as not_after

from .conftest import JOBD


def cert(tmp_path: Path, days: float) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    end = (now + datetime.timedelta(days=days)).replace(microsecond=0)
    leaf = trustme.CA().issue_cert("x.example", not_after=end)
    path = tmp_path / f"{days}.pem"
    leaf.cert_chain_pems[0].write_to_path(str(path))
    return path


def test_not_after_is_the_certificates_date(tmp_path: Path) -> None:
    path = cert(tmp_path, 100)
    end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=100)
    assert not_after(path) is not None
    assert abs(not_after(path) - end.timestamp()) < 120  # type: ignore[operator]
    assert not_after(tmp_path / "missing.pem") is None


def test_warnings_from_14_days_then_daily(tmp_path: Path) -> None:
    far, near = cert(tmp_path, 100), cert(tmp_path, 10)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    due, wake = expiry_warnings({"certificate": far, "ca": far}, now)
    assert due == [] and wake == REPEAT_SECONDS  # checked again tomorrow
    due, wake = expiry_warnings({"certificate": near, "ca": far}, now)
    assert [(d["which"], d["expired"]) for d in due] == [("certificate", False)]
    assert 9 <= due[0]["days_left"] <= 10  # type: ignore[operator]
    # 14.5 days left: wake when the 14-day window opens (in half a day), not a day later.
    _, wake = expiry_warnings({"ca": cert(tmp_path, 14.5)}, now)
    assert 0.45 * 86400 < wake <= 0.5 * 86400


def der_not_after(path: Path) -> float:
    """What cryptography reads as the certificate's notAfter."""
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_not_after_from_trustme_openssl_and_jobd_ca(tmp_path: Path) -> None:
    """The DER walk agrees with cryptography on certificates from three makers,
    UTCTime (through 2049) and GeneralizedTime (from 2050) alike."""
    made: list[Path] = []
    ca = trustme.CA()
    for year in (2030, 2049, 2050, 2107):
        end = datetime.datetime(year, 2, 28, 23, 59, 58, tzinfo=datetime.UTC)
        path = tmp_path / f"trustme-{year}.pem"
        ca.issue_cert("x.example", not_after=end).cert_chain_pems[0].write_to_path(str(path))
        made.append(path)
    for days in (1, 20000):  # openssl writes 2080 as GeneralizedTime
        path = tmp_path / f"openssl-{days}.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                        "-subj", "/CN=x", "-days", str(days), "-out", str(path)],
                       check=True, capture_output=True)
        made.append(path)
    subprocess.run([*JOBD, "ca", "init", str(tmp_path / "ca")], check=True, capture_output=True)
    made.append(tmp_path / "ca" / "ca.pem")
    for path in made:
        assert not_after(path) == der_not_after(path), path
    years = {datetime.datetime.fromtimestamp(not_after(path) or 0, datetime.UTC).year
             for path in made}
    assert {2049, 2050, 2107} <= years


def test_not_after_reads_the_first_certificate_of_a_chain(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("x.example", not_after=datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes())
    assert not_after(chain) == datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC).timestamp()


def test_not_after_of_what_is_no_certificate_is_unknown(tmp_path: Path) -> None:
    good = trustme.CA().cert_pem.bytes()
    der = first_certificate(good)
    for text in (b"", b"hello", good.replace(b"END CERTIFICATE", b"END NOTHING"),
                 good.replace(b"\nM", b"\n!")):
        (tmp_path / "bad.pem").write_bytes(text)
        assert not_after(tmp_path / "bad.pem") is None
    for blob in (b"", der[:40], b"\x30\x03\x02\x01\x00", b"\x04" + der[1:]):
        with pytest.raises(CertificateFormatError):
            der_not_after_walk(blob)


def test_times_in_the_forms_rfc_5280_allows() -> None:
    def utc(*args: int) -> float:
        return datetime.datetime(*args, tzinfo=datetime.UTC).timestamp()

    assert _time(0x17, b"491231235959Z") == utc(2049, 12, 31, 23, 59, 59)
    assert _time(0x17, b"500101000000Z") == utc(1950, 1, 1)
    assert _time(0x18, b"20500101000000Z") == utc(2050, 1, 1)
    assert _time(0x18, b"20240229120000Z") == utc(2024, 2, 29, 12)
    for tag, raw in ((0x17, b"3001010000Z"), (0x17, b"300101000000+"),
                     (0x18, b"20300101000000"), (0x18, b"20301301000000Z"),
                     (0x17, b"30010100000aZ"), (0x18, b"2030010100000.5Z"),
                     (0x02, b"300101000000Z")):
        with pytest.raises(CertificateFormatError):
            _time(tag, raw)
